"""Soak test: a sustained, mixed, multi-threaded load on the runtime for a bounded time.

    python bench/soak.py --model export/<run> --model models/<run> --seconds 120 --threads 4

Each request picks a model (``--model`` may repeat: backends and precisions mix), an input kind
(path, bytes, PIL image, uint8 array), a batch size and top-k at random; one request in 50 is a
corrupt image, which must be refused with a ``TlDeployError`` and nothing else. Reports throughput,
latency percentiles and resident memory over time: growth after warm-up must stay under
``--max-growth-mib``. Prints one ``PASSED | ...`` or ``FAILED | ...`` line, exits non-zero on failure,
and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_deploy.errors import TlDeployError  # noqa: E402
from tl_deploy.fileio import atomic_write_json  # noqa: E402
from tl_deploy.preprocess import IMAGE_EXTENSIONS  # noqa: E402
from tl_deploy.runtime import load  # noqa: E402

BATCH_SIZES = (1, 1, 1, 1, 2, 4, 8, 16)  # mostly single images, like an app; some batches
KINDS = ("path", "bytes", "pil", "array")


def rss_mib() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class Soak:
    def __init__(self, models: list[Any], images: list[Path], seed: int) -> None:
        self.models = models
        self.images = images
        self.bytes = [p.read_bytes() for p in images]
        self.seed = seed
        self.lock = threading.Lock()
        self.latencies: list[tuple[float, float, int]] = []  # (finish time, seconds, images)
        self.refused = 0
        self.unexpected: list[str] = []
        self.stop = threading.Event()

    def make_input(self, rng: np.random.Generator, kind: str, index: int) -> Any:
        if kind == "path":
            return self.images[index]
        if kind == "bytes":
            return self.bytes[index]
        with Image.open(self.images[index]) as img:
            img.load()
            return img if kind == "pil" else np.asarray(img.convert("RGB"))

    def worker(self, t: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + t)
        while not self.stop.is_set():
            clf = self.models[int(rng.integers(len(self.models)))]
            corrupt = rng.random() < 0.02
            batch = int(rng.choice(BATCH_SIZES))
            kind = str(rng.choice(KINDS))
            idx = rng.integers(0, len(self.images), batch)
            items = [self.make_input(rng, kind, int(i)) for i in idx]
            if corrupt:
                items[0] = self.bytes[int(idx[0])][: 40]  # a truncated file in the batch
            top_k = int(rng.integers(1, len(clf.class_names) + 1))
            start = time.perf_counter()
            try:
                clf.predict(items, top_k=top_k)
            except TlDeployError:
                if not corrupt:
                    with self.lock:
                        self.unexpected.append("refused a valid request")
                else:
                    with self.lock:
                        self.refused += 1
                continue
            except Exception as exc:  # anything else is a bug the soak must report
                with self.lock:
                    self.unexpected.append(f"{type(exc).__name__}: {exc}")
                continue
            end = time.perf_counter()
            if corrupt:
                with self.lock:
                    self.unexpected.append("a corrupt image was not refused")
            with self.lock:
                self.latencies.append((end, end - start, batch))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="artifact folder, export folder or .onnx file; repeat to mix backends")
    p.add_argument("--precision", action="append", default=None,
                   help="with an export folder: also load these precisions (e.g. fp32 int8) as separate models")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "animal-shape" / "test", help="images to send")
    p.add_argument("--seconds", type=float, default=120.0, help="total duration, warm-up included")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the memory baseline is taken")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--max-images", type=int, default=500, help="distinct images in the pool")
    p.add_argument("--max-growth-mib", type=float, default=16.0, help="allowed RSS growth after warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = p.parse_args()
    if args.warmup >= args.seconds:
        p.error("--warmup must be shorter than --seconds")

    images = sorted(q for q in args.data.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)[: args.max_images]
    if not images:
        p.error(f"no images under {args.data}")
    models = []
    for path in args.model:
        if Path(path, "export.json").is_file():  # an export folder: one classifier per precision asked
            models.extend(load(path, precision=precision) for precision in args.precision or ["auto"])
        else:
            models.append(load(path))
    names = [f"{m.backend_name}/{m.precision}" for m in models]
    soak = Soak(models, images, args.seed)
    rss: list[tuple[float, float]] = [(0.0, rss_mib())]
    threads = [threading.Thread(target=soak.worker, args=(t,), daemon=True) for t in range(args.threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while (now := time.perf_counter() - t0) < args.seconds:
        time.sleep(1.0)
        rss.append((now, rss_mib()))
    soak.stop.set()
    for t in threads:
        t.join(timeout=30)
    wall = time.perf_counter() - t0

    steady = [(end - t0, sec, n) for end, sec, n in soak.latencies if end - t0 >= args.warmup]
    steady_s = args.seconds - args.warmup
    lat_ms = [sec * 1000 for _, sec, _ in steady]
    single_ms = [sec * 1000 for _, sec, n in steady if n == 1]
    after = [(t, m) for t, m in rss if t >= args.warmup]
    baseline = after[0][1]
    slope = float(np.polyfit([t for t, _ in after], [m for _, m in after], 1)[0]) * 60 if len(after) > 2 else 0.0
    result = {
        "models": names, "threads": args.threads, "seconds": round(wall, 1), "warmup_s": args.warmup,
        "requests": len(soak.latencies), "requests_after_warmup": len(steady),
        "images_per_s": round(sum(n for _, _, n in steady) / steady_s, 1),
        "requests_per_s": round(len(steady) / steady_s, 1),
        "latency_ms": {"p50": round(percentile(lat_ms, 50), 2), "p95": round(percentile(lat_ms, 95), 2),
                       "p99": round(percentile(lat_ms, 99), 2), "max": round(max(lat_ms, default=float("nan")), 2)},
        "latency_ms_batch1": {"p50": round(percentile(single_ms, 50), 2), "p99": round(percentile(single_ms, 99), 2)},
        "corrupt_refused": soak.refused, "unexpected_errors": len(soak.unexpected),
        "unexpected_examples": soak.unexpected[:5],
        "rss_mib": {"start": round(rss[0][1], 1), "after_warmup": round(baseline, 1), "end": round(rss[-1][1], 1),
                    "max_after_warmup": round(max(m for _, m in after), 1)},
        "rss_growth_after_warmup_mib": round(rss[-1][1] - baseline, 1),
        "rss_slope_mib_per_min": round(slope, 2),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, result)
    print(json.dumps(result, indent=2))
    growth = result["rss_growth_after_warmup_mib"]
    ok = not soak.unexpected and growth <= args.max_growth_mib and len(steady) > 0
    verdict = "PASSED" if ok else "FAILED"
    print(f"{verdict} | {len(steady)} requests in {steady_s:.0f} s after warm-up, {result['images_per_s']} img/s, "
          f"p99 {result['latency_ms']['p99']} ms, RSS growth {growth:+.1f} MiB (limit {args.max_growth_mib}), "
          f"{len(soak.unexpected)} unexpected errors, {soak.refused} corrupt inputs refused")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
