"""Export benchmark: PyTorch eager vs ONNX Runtime FP32 vs INT8, side by side in one run.

    python bench/bench_export.py --model-dir models/<run> [--export-dir export/<run>] [--threads 2]

Without ``--export-dir`` it first runs ``python -m tl_deploy.export MODEL_DIR --int8`` into a
temporary folder and times it (the whole command, interpreter start included). Throughput is
measured at batch 1 (and ``--batch``), every backend with the same thread count, in interleaved
rounds so that background load hits all of them alike, with idle thread pools set not to spin (they
would steal the cores of the backend being timed); the median round is reported, and the best round
too, because on a shared machine the best round is the least disturbed. Accuracy is measured on
the data's test split. Results are printed and written to bench/results/bench_export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None, help="model artifact (default: newest in models/)")
    p.add_argument("--export-dir", type=Path, default=None, help="existing export folder (default: export now)")
    p.add_argument("--data", type=Path, default=None, help="ImageFolder with test/ (default: training.data)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every backend (default 2)")
    p.add_argument("--batch", type=int, default=8, help="second batch size to measure (default 8)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    p.add_argument("--seconds", type=float, default=0.4, help="time per backend per round (default 0.4)")
    p.add_argument("--accuracy-limit", type=int, default=0, help="test images for accuracy (0: all)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_export.json")
    return p


def newest_artifact() -> Path:
    candidates = sorted((p for p in (ROOT / "models").glob("*") if (p / "config.json").is_file()),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit("error: no model artifact in models/: pass --model-dir")
    return candidates[-1]


def run_export(model_dir: Path, out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tl_deploy.export", str(model_dir), "--int8", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: export failed: {proc.stderr.strip().splitlines()[-1]}")
    print(proc.stdout)
    return seconds


def throughput(fns: dict[str, Callable[[], object]], batch: int, rounds: int, seconds: float) -> dict[str, dict]:
    """Images per second per backend: interleaved rounds, each running a backend for ~``seconds``."""
    per_call = {}
    for name, fn in fns.items():  # warm-up and calibrate the number of calls per round
        for _ in range(5):
            fn()
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < 0.2:
            fn()
            n += 1
        per_call[name] = max(1, int(seconds / ((time.perf_counter() - start) / n)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(per_call[name]):
                fn()
            samples[name].append(per_call[name] * batch / (time.perf_counter() - start))
    return {name: {"median": statistics.median(v), "best": max(v)} for name, v in samples.items()}


def main() -> None:
    args = get_args_parser().parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # Idle workers must not spin while another backend runs, or interleaving measures the spinning:
    # torch's OpenMP threads wait passively, onnxruntime's pools do not spin (same rule for both).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import onnxruntime as ort
    import torch

    from tl_deploy.artifact import load_artifact
    from tl_deploy.data import load_splits
    from tl_deploy.preprocess import prepare

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or newest_artifact()
    artifact = load_artifact(model_dir)
    result: dict = {"model_dir": str(model_dir), "architecture": artifact.architecture.name,
                    "input_size": artifact.spec.input_size, "threads": args.threads}
    tmp = None
    if args.export_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_export_")
        export_dir = Path(tmp.name) / model_dir.name
        result["export_seconds"] = run_export(model_dir, export_dir)
    else:
        export_dir = args.export_dir
    files = {"onnx_fp32": export_dir / "model.onnx", "int8_cpu": export_dir / "model.int8.cpu.onnx",
             "int8_qdq": export_dir / "model.int8.onnx"}
    files = {k: v for k, v in files.items() if v.is_file()}

    def session(path: Path, exact: bool = False) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if exact:  # Q/DQ run as written: the integer arithmetic TensorRT performs
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = {k: session(v) for k, v in files.items()}
    size = artifact.spec.input_size
    model = artifact.model.eval()

    def torch_fn(x: np.ndarray) -> Callable[[], object]:
        t = torch.from_numpy(x)

        def run() -> object:
            with torch.inference_mode():
                return model(t)
        return run

    def ort_fn(s: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
        return lambda: s.run(None, {"input": x})

    result["throughput"] = {}
    for batch in sorted({1, args.batch}):
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        fns = {"torch_eager": torch_fn(x), **{k: ort_fn(s, x) for k, s in sessions.items()}}
        result["throughput"][str(batch)] = throughput(fns, batch, args.rounds, args.seconds)

    data_dir = args.data or Path(str((artifact.config.get("training") or {}).get("data", "")))
    if data_dir and (data_dir / "test").is_dir():
        test = load_splits(data_dir, verify_images=False).test
        if args.accuracy_limit:
            test = test[:: max(1, len(test) // args.accuracy_limit)][: args.accuracy_limit]
        xs = np.stack([prepare(p, artifact.spec) for p, _ in test])
        ys = np.array([label for _, label in test])
        acc = {}
        for key, path in files.items():
            s = session(path, exact=key == "int8_qdq")
            logits = np.concatenate([s.run(None, {"input": xs[i:i + 100]})[0] for i in range(0, len(xs), 100)])
            label = key + (" (exact int8 math, as TensorRT)" if key == "int8_qdq" else "")
            acc[label] = float((logits.argmax(1) == ys).mean())
        result["accuracy"] = {"split": f"{data_dir}/test", "images": len(ys), **acc}
    result["size_mb"] = {k: v.stat().st_size / 1e6 for k, v in files.items()}

    # ---- report
    print(f"\n{artifact.architecture.name} @ {size}px, {args.threads} thread(s), {model_dir}")
    if "export_seconds" in result:
        print(f"export (ONNX + INT8, CLI wall time): {result['export_seconds']:.1f} s")
    for batch, rows in result["throughput"].items():
        base = rows["torch_eager"]
        print(f"\nbatch {batch}: img/s median (best)   ratio vs torch   ratio vs ORT FP32")
        for name, v in rows.items():
            fp32 = rows.get("onnx_fp32", base)
            print(f"  {name:12s} {v['median']:8.1f} ({v['best']:7.1f})   {v['median'] / base['median']:5.2f}x "
                  f"({v['best'] / base['best']:4.2f}x)   {v['median'] / fp32['median']:5.2f}x "
                  f"({v['best'] / fp32['best']:4.2f}x)")
    if "accuracy" in result:
        print(f"\naccuracy on {result['accuracy']['images']} test images:")
        fp32_acc = result["accuracy"].get("onnx_fp32")
        for key, value in result["accuracy"].items():
            if isinstance(value, float):
                delta = f"  ({100 * (value - fp32_acc):+.2f} pt vs FP32)" if fp32_acc is not None else ""
                print(f"  {key:45s} {100 * value:6.2f}%{delta}")
    print("\nsize MB: " + ", ".join(f"{k} {v:.2f}" for k, v in result["size_mb"].items()))
    if "int8_cpu" in result["size_mb"]:
        print(f"INT8/FP32 size: {result['size_mb']['int8_cpu'] / result['size_mb']['onnx_fp32']:.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
