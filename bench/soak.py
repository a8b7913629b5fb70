"""Soak test: a sustained, mixed, multi-threaded load on each backend for a bounded time.

    python bench/soak.py --model export/<run> --model models/<run> --seconds 360 --warmup 60

Each backend runs in its own phase, in a fresh process, so its memory is measured alone: an
artifact folder is one phase (PyTorch), an export folder one phase per ONNX file onnxruntime runs
(FP32, INT8 CPU, INT8 QDQ; ``--precision`` picks files as ``runtime.load`` does instead), a file
one phase. ``--mixed`` adds a phase sharing every model in one process. In a phase each request
picks a model, an input kind (path, bytes, PIL image, uint8 array), a batch size and top-k at
random; one request in 50 carries a corrupt image, which must be refused with a ``TlDeployError``
and nothing else, and one in 200 a large photo-sized image (4000x3000). Resident memory is sampled
every second; its slope after the warm-up (MiB/min, Theil-Sen: robust to the spike of one large
request) must stay within ``--max-slope``. Reports throughput, latency percentiles and memory per phase, prints one
``PASSED | ...`` or ``FAILED | ...`` line, exits non-zero on failure, and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import math
import subprocess
import sys
import tempfile
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
from tl_deploy.formats.export_manifest import is_export_folder, read_export_manifest, usable_files  # noqa: E402
from tl_deploy.preprocess import IMAGE_EXTENSIONS  # noqa: E402

BATCH_SIZES = (1, 1, 1, 1, 2, 4, 8, 16)  # mostly single images, like an app; some batches
KINDS = ("path", "bytes", "pil", "array")
CORRUPT_RATE = 1 / 50  # requests whose first image is a truncated file
HUGE_RATE = 1 / 200  # requests whose first image is a 4000x3000 photo-sized PNG
HUGE_SIZE = (4000, 3000)
# Latency histogram: log-spaced bins from 10 us to 1000 s, 1% apart. Memory stays constant however
# long the soak runs (a list of every request's latency would itself grow ~0.5 MiB/min).
_BIN_BASE = 1.01
_BIN_MIN_S = 1e-5
_NUM_BINS = int(math.log(1e3 / _BIN_MIN_S, _BIN_BASE)) + 2


def rss_mib() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO = _mallinfo2()


def malloc_mib() -> tuple[float, float]:
    """(bytes in use, bytes held from the system) by glibc malloc, in MiB; NaN when not glibc.

    RSS growing while "in use" stays flat is memory the allocator keeps, not a leak of objects.
    """
    if _MALLINFO is None:
        return float("nan"), float("nan")
    info = _MALLINFO()
    return info.uordblks / 2**20, (info.arena + info.hblkhd) / 2**20


def slope_per_min(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y over t (seconds), per minute; NaN with fewer than 3 finite points."""
    keep = np.isfinite(y)
    if keep.sum() < 3:
        return float("nan")
    return float(np.polyfit(t[keep], y[keep], 1)[0]) * 60


def robust_slope_per_min(t: np.ndarray, y: np.ndarray, max_points: int = 1200) -> float:
    """Theil-Sen slope (median of the pairwise slopes), per minute; NaN with fewer than 3 finite points.

    A request decoding a large image lifts RSS for a sample or two; least squares lets such a spike
    near either end tilt the line by tenths of a MiB/min, the median of pairwise slopes ignores it.
    """
    keep = np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(t) < 3:
        return float("nan")
    step = max(1, len(t) // max_points)  # bound the pairs (n^2 / 2) for long soaks
    t, y = t[::step], y[::step]
    i, j = np.triu_indices(len(t), k=1)
    dt = t[j] - t[i]
    return float(np.median((y[j] - y[i])[dt > 0] / dt[dt > 0])) * 60


class LatencyHistogram:
    """Counts of request latencies in log-spaced bins (constant memory); percentiles within 1%."""

    def __init__(self) -> None:
        self.counts = np.zeros(_NUM_BINS, dtype=np.int64)
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        index = int(math.log(max(seconds, _BIN_MIN_S) / _BIN_MIN_S, _BIN_BASE))
        self.counts[min(index, _NUM_BINS - 1)] += 1
        self.max_s = max(self.max_s, seconds)

    def percentile_ms(self, q: float) -> float:
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        index = int(np.searchsorted(np.cumsum(self.counts), math.ceil(total * q / 100)))
        return _BIN_MIN_S * _BIN_BASE ** (index + 0.5) * 1000  # the bin's geometric middle


def make_huge_png() -> bytes:
    """A photo-sized PNG (a gradient, so the decoder does real work) kept as bytes."""
    w, h = HUGE_SIZE
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)  # (H, W)
    rgb = np.stack([ramp, ramp.T[:h, :1].repeat(w, 1) if h <= w else ramp, 255 - ramp], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Soak:
    """Worker threads sending requests to ``models`` until ``stop`` is set; counters, no per-request lists."""

    def __init__(self, models: list[Any], images: list[Path], seed: int, warmup_end: float) -> None:
        self.models = models
        self.images = images
        self.bytes = [p.read_bytes() for p in images]
        self.huge = make_huge_png()
        self.seed = seed
        self.warmup_end = warmup_end  # perf_counter time after which requests count as steady
        self.lock = threading.Lock()
        self.latency = LatencyHistogram()
        self.latency_batch1 = LatencyHistogram()
        self.requests = 0
        self.requests_steady = 0
        self.images_steady = 0
        self.refused = 0
        self.huge_sent = 0
        self.unexpected_count = 0
        self.unexpected: list[str] = []  # the first few only
        self.stop = threading.Event()

    def make_input(self, kind: str, index: int) -> Any:
        if kind == "path":
            return self.images[index]
        if kind == "bytes":
            return self.bytes[index]
        with Image.open(self.images[index]) as img:
            img.load()
            return img if kind == "pil" else np.asarray(img.convert("RGB"))

    def report(self, problem: str) -> None:
        with self.lock:
            self.unexpected_count += 1
            if len(self.unexpected) < 5:
                self.unexpected.append(problem)

    def worker(self, t: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + t)
        while not self.stop.is_set():
            clf = self.models[int(rng.integers(len(self.models)))]
            draw = rng.random()
            corrupt, huge = draw < CORRUPT_RATE, CORRUPT_RATE <= draw < CORRUPT_RATE + HUGE_RATE
            batch = int(rng.choice(BATCH_SIZES))
            kind = str(rng.choice(KINDS))
            idx = rng.integers(0, len(self.images), batch)
            items = [self.make_input(kind, int(i)) for i in idx]
            if corrupt:
                items[0] = self.bytes[int(idx[0])][:40]  # a truncated file in the batch
            elif huge:
                items[0] = self.huge
            top_k = int(rng.integers(1, len(clf.class_names) + 1))
            start = time.perf_counter()
            try:
                clf.predict(items, top_k=top_k)
            except TlDeployError:
                if corrupt:
                    with self.lock:
                        self.refused += 1
                elif not huge:  # a large image may be refused by a size bound; a good one never
                    self.report("refused a valid request")
                continue
            except Exception as exc:  # anything else is a bug the soak must report
                self.report(f"{type(exc).__name__}: {exc}")
                continue
            end = time.perf_counter()
            if corrupt:
                self.report("a corrupt image was not refused")
                continue
            with self.lock:
                self.requests += 1
                self.huge_sent += huge
                if end >= self.warmup_end:
                    self.requests_steady += 1
                    self.images_steady += batch
                    self.latency.add(end - start)
                    if batch == 1:
                        self.latency_batch1.add(end - start)


def load_models(target: dict[str, Any]) -> list[Any]:
    from tl_deploy.runtime import load

    return [load(path, precision=precision) for path, precision in target["load"]]


def run_phase(target: dict[str, Any], data: Path, seconds: float, warmup: float, threads: int,
              max_images: int, seed: int) -> dict[str, Any]:
    """Load the phase's models in this process, run the load, and return its figures."""
    images = sorted(q for q in data.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS)[:max_images]
    models = load_models(target)
    samples = np.full((int(seconds) + 8, 4), np.nan)  # (time, RSS, malloc in use, malloc held)
    samples[0] = (0.0, rss_mib(), *malloc_mib())
    n = 1
    t0 = time.perf_counter()
    soak = Soak(models, images, seed, warmup_end=t0 + warmup)
    workers = [threading.Thread(target=soak.worker, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    while (now := time.perf_counter() - t0) < seconds:
        time.sleep(1.0)
        if n < len(samples):
            samples[n] = (now, rss_mib(), *malloc_mib())
            n += 1
    soak.stop.set()
    deadline = time.perf_counter() + 60  # requests in flight finish; a stuck one does not hold the run
    for w in workers:
        w.join(timeout=max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - t0
    samples = samples[:n]
    after = samples[samples[:, 0] >= warmup]
    steady_s = seconds - warmup
    return {
        "phase": target["name"], "models": [f"{m.backend_name}/{m.precision} {Path(m.source).name}" for m in models],
        "threads": threads, "seconds": round(wall, 1), "warmup_s": warmup,
        "requests": soak.requests, "requests_after_warmup": soak.requests_steady,
        "images_per_s": round(soak.images_steady / steady_s, 1),
        "requests_per_s": round(soak.requests_steady / steady_s, 1),
        "latency_ms": {q: round(soak.latency.percentile_ms(p), 2) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
        | {"max": round(soak.latency.max_s * 1000, 2)},
        "latency_ms_batch1": {"p50": round(soak.latency_batch1.percentile_ms(50), 2),
                              "p99": round(soak.latency_batch1.percentile_ms(99), 2)},
        "corrupt_refused": soak.refused, "huge_predicted": soak.huge_sent,
        "unexpected_errors": soak.unexpected_count, "unexpected_examples": soak.unexpected,
        "rss_mib": {"start": round(samples[0, 1], 1), "after_warmup": round(after[0, 1], 1),
                    "end": round(samples[-1, 1], 1), "max_after_warmup": round(float(after[:, 1].max()), 1)},
        "rss_growth_after_warmup_mib": round(samples[-1, 1] - after[0, 1], 1),
        "rss_slope_mib_per_min": round(robust_slope_per_min(after[:, 0], after[:, 1]), 2),
        "rss_slope_least_squares_mib_per_min": round(slope_per_min(after[:, 0], after[:, 1]), 2),
        "malloc_in_use_slope_mib_per_min": round(robust_slope_per_min(after[:, 0], after[:, 2]), 2),
        "malloc_held_mib": {"after_warmup": round(after[0, 3], 1), "end": round(samples[-1, 3], 1)},
        "rss_samples": [[round(t, 1), round(m, 1)] for t, m in samples[::10, :2]],  # every 10 s
    }


def export_files(folder: Path) -> list[str]:
    """The ONNX files of an export folder that onnxruntime runs on float NCHW input, as export.json lists them."""
    return [str(f["file"]) for f in usable_files(read_export_manifest(folder)["files"]) if f.get("kind") == "onnx"]


def plan_phases(models: list[str], precisions: list[str] | None, mixed: bool) -> list[dict[str, Any]]:
    """One phase per backend file (``load`` arguments and a name), plus the mixed phase when asked."""
    phases: list[dict[str, Any]] = []
    for model in models:
        path = Path(model)
        if is_export_folder(path):
            if precisions:
                phases += [{"name": f"{path.name} {p}", "load": [[str(path), p]]} for p in precisions]
            else:
                phases += [{"name": f"{path.name}/{f}", "load": [[str(path / f), "auto"]]}
                           for f in export_files(path)]
        else:
            phases.append({"name": path.name if path.is_dir() else f"{path.parent.name}/{path.name}",
                           "load": [[str(path), "auto"]]})
    if mixed and len(phases) > 1:
        phases.append({"name": "mixed", "load": [pair for p in phases for pair in p["load"]]})
    return phases


def run_child(phase: dict[str, Any], args: argparse.Namespace, out: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase-json", json.dumps(phase),
           "--phase-out", str(out), "--data", str(args.data), "--seconds", str(args.seconds),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--max-images", str(args.max_images),
           "--seed", str(args.seed)]
    return subprocess.Popen(cmd)


def verdict(result: dict[str, Any], max_slope: float) -> str:
    """Why the phase fails, or "" when it passes."""
    problems = []
    if result["unexpected_errors"]:
        problems.append(f"{result['unexpected_errors']} unexpected errors")
    if result["requests_after_warmup"] == 0:
        problems.append("no request finished after warm-up")
    slope = result["rss_slope_mib_per_min"]
    if not slope <= max_slope:
        problems.append(f"RSS slope {slope:+.2f} MiB/min > {max_slope}")
    return ", ".join(problems)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=[],
                   help="artifact folder, export folder or .onnx file; repeat for more phases")
    p.add_argument("--precision", action="append", default=None,
                   help="with an export folder: one phase per precision picked as runtime.load does "
                        "(default: one phase per ONNX file in the folder)")
    p.add_argument("--mixed", action="store_true", help="also run one phase sharing every model in one process")
    p.add_argument("--parallel", action="store_true",
                   help="run the phases at the same time (each in its own process; shares the cores)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "animal-shape" / "test", help="images to send")
    p.add_argument("--seconds", type=float, default=120.0, help="duration of each phase, warm-up included")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before memory is tracked")
    p.add_argument("--threads", type=int, default=4, help="client threads per phase")
    p.add_argument("--max-images", type=int, default=500, help="distinct images in the pool")
    p.add_argument("--max-slope", type=float, default=0.5, help="allowed RSS slope after warm-up, MiB/min")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    p.add_argument("--phase-json", help=argparse.SUPPRESS)  # internal: run one phase in this process
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 0 <= args.warmup < args.seconds - 2:
        p.error(f"--warmup {args.warmup} must be >= 0 and at least 3 s shorter than --seconds {args.seconds}")
    if args.threads < 1:
        p.error(f"--threads {args.threads}: choose 1 or more")
    if not any(q.suffix.lower() in IMAGE_EXTENSIONS for q in args.data.rglob("*")):
        p.error(f"no images under {args.data}: pass --data DIR")

    if args.phase_json:  # a child: one phase, figures to --phase-out
        result = run_phase(json.loads(args.phase_json), args.data, args.seconds, args.warmup, args.threads,
                           args.max_images, args.seed)
        atomic_write_json(args.phase_out, result)
        return 0

    if not args.model:
        p.error("pass at least one --model")
    try:
        phases = plan_phases(args.model, args.precision, args.mixed)
        for phase in phases:  # fail here, with one line, rather than in a child
            for path, _ in phase["load"]:
                if not Path(path).exists():
                    raise TlDeployError(f"Model not found: {path}.")
    except (TlDeployError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        outs = [Path(tmp) / f"phase{i}.json" for i in range(len(phases))]
        batches = [list(range(len(phases)))] if args.parallel else [[i] for i in range(len(phases))]
        for batch in batches:
            procs = [(i, run_child(phases[i], args, outs[i])) for i in batch]
            for i, proc in procs:
                if proc.wait() != 0 or not outs[i].is_file():
                    results.append({"phase": phases[i]["name"], "failed": f"exit code {proc.returncode}"})
                else:
                    results.append(json.loads(outs[i].read_text()))
    summary = {"max_slope_mib_per_min": args.max_slope, "parallel": args.parallel, "phases": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, summary)

    print(f"{'phase':<34} {'requests':>8} {'img/s':>7} {'p99 ms':>8} {'RSS MiB':>15} {'slope':>7} "
          f"{'malloc':>7}  verdict")
    failed = []
    for r in results:
        if "failed" in r:
            failed.append(f"{r['phase']}: {r['failed']}")
            print(f"{r['phase']:<34} {'':>8} {'':>7} {'':>8} {'':>15} {'':>7} {'':>7}  FAILED ({r['failed']})")
            continue
        why = verdict(r, args.max_slope)
        if why:
            failed.append(f"{r['phase']}: {why}")
        rss = f"{r['rss_mib']['after_warmup']:.0f} -> {r['rss_mib']['end']:.0f}"
        print(f"{r['phase']:<34} {r['requests_after_warmup']:>8} {r['images_per_s']:>7} "
              f"{r['latency_ms']['p99']:>8} {rss:>15} {r['rss_slope_mib_per_min']:>+7.2f} "
              f"{r['malloc_in_use_slope_mib_per_min']:>+7.2f}  {'FAILED (' + why + ')' if why else 'ok'}")
    print("(slope: RSS MiB/min after warm-up; malloc: MiB/min of glibc malloc bytes in use)")
    steady = args.seconds - args.warmup
    line = (f"{len(results)} phases of {steady:.0f} s after a {args.warmup:.0f} s warm-up, {args.threads} threads, "
            f"RSS slope limit {args.max_slope} MiB/min; figures in {args.json}")
    print(f"FAILED | {line} | " + "; ".join(failed) if failed else f"PASSED | {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
