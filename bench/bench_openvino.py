"""OpenVINO choices measured on one export folder: reading the QDQ/FP32 ONNX directly vs an OpenVINO IR
(``openvino.save_model`` -> .xml/.bin), and the runner's request pool vs a new infer request per call.

    PYTHONPATH=$PWD python bench/bench_openvino.py export/animal-shape-efficientnet_lite0-lp-ft --threads 2

Prints two tables: compile time (read + compile in a fresh ``ov.Core``, median of --compiles) and
batch-1 latency (p50 over interleaved rounds) per file and format; one image per call on the INT8 file
with the batch dimension dynamic vs a batch-1 graph, bare request vs ``runner.infer``; then p50 latency
of one call and the throughput of 8 threads sharing one compiled model, pool vs per-call requests. With ``--nncf DATA``
(an ImageFolder root; needs ``pip install nncf``) also OpenVINO's own INT8 (NNCF post-training
quantization of ``model.onnx`` on --calib train images, evenly spaced, like ``export --int8``) against
the QDQ ``model.int8.onnx``: test accuracy and batch-1 latency. Figures in docs/speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tl_deploy.runtime.openvino_backend import PERFORMANCE_HINT


def compile_config(threads: int) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": PERFORMANCE_HINT,
            "INFERENCE_NUM_THREADS": str(threads)}


def compile_seconds(ov, path: Path, threads: int, repeats: int) -> float:
    """Median seconds to read ``path`` and compile it for the CPU, each time in a fresh Core."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        core = ov.Core()
        core.compile_model(core.read_model(str(path)), "CPU", compile_config(threads))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_p50(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """p50 milliseconds per call; each round times every function once, in turn, so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(10):
            fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def ir_vs_onnx(ov, export_dir: Path, threads: int, repeats: int, rounds: int) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sources: dict[str, Path] = {}
        for name in ("model.onnx", "model.int8.onnx"):
            onnx_path = export_dir / name
            if not onnx_path.is_file():
                continue
            ir_path = Path(tmp) / f"{onnx_path.stem}.xml"
            ov.save_model(ov.Core().read_model(str(onnx_path)), str(ir_path), compress_to_fp16=False)
            sources[f"{name} (ONNX)"], sources[f"{name} (IR)"] = onnx_path, ir_path
        fns, compile_s = {}, {}
        for label, path in sources.items():
            compile_s[label] = compile_seconds(ov, path, threads, repeats)
            core = ov.Core()
            model = core.read_model(str(path))
            size = model.input().get_partial_shape()[2].get_length()
            batch = np.ascontiguousarray(x[:, :, :size, :size])
            request = core.compile_model(model, "CPU", compile_config(threads)).create_infer_request()
            fns[label] = lambda r=request, b=batch: r.infer({0: b})
        latency = interleaved_p50(fns, rounds, 20)
    print(f"{'file':<28} {'compile s':>10} {'p50 ms b1':>10}")
    for label in sources:
        print(f"{label:<28} {compile_s[label]:>10.3f} {latency[label]:>10.3f}")


def pool_vs_per_call(export_dir: Path, threads: int, rounds: int) -> None:
    from tl_deploy.runtime.openvino_backend import OpenVinoRunner

    runner = OpenVinoRunner(export_dir / "model.int8.onnx", threads=threads)
    runner.activate()
    spec = runner.input_spec()
    size = spec.shape[2] if spec and spec.shape[2] else 224
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)

    graph = runner._single_image()  # what runner.infer uses for one image: the batch-1 graph
    compiled = graph[0] if graph is not None else runner.compiled

    def per_call() -> object:
        request = compiled.create_infer_request()
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data)

    fns = {"pool (runner.infer)": lambda: runner.infer(x), "new request per call": per_call}
    latency = interleaved_p50(fns, rounds, 20)
    print(f"\n{'requests':<24} {'p50 ms b1':>10} {'8 threads img/s':>16}")
    for name, fn in fns.items():
        print(f"{name:<24} {latency[name]:>10.3f} {threaded_rate(fn, 8, 2.0):>16.1f}")
    runner.deactivate()


def batch1_graph(export_dir: Path, threads: int, rounds: int) -> None:
    """One image per call on ``model.int8.onnx``: the graph with its batch left dynamic vs a copy reshaped
    to batch 1 (what the runner compiles for one-image calls), and the runner's own cost per call
    (``runner.infer``) vs a bare infer request on that same batch-1 graph."""
    from tl_deploy.runtime.openvino_backend import OpenVinoRunner

    # Both graphs from the runner's own Core: two Cores' thread pools would slow each other down.
    runner = OpenVinoRunner(export_dir / "model.int8.onnx", threads=threads)
    runner.activate()
    spec = runner.input_spec()
    size = spec.shape[2] if spec and spec.shape[2] else 224
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    runner.infer(x)  # compiles the batch-1 graph
    graph = runner._single_image()
    static = graph[0] if graph is not None else runner.compiled
    dynamic_request, static_request = runner.compiled.create_infer_request(), static.create_infer_request()
    fns = {"dynamic batch, bare request": lambda: dynamic_request.infer({0: x}),
           "batch-1 graph, bare request": lambda: static_request.infer({0: x}),
           "batch-1 graph, runner.infer": lambda: runner.infer(x)}
    latency = interleaved_p50(fns, rounds, 20)
    print(f"\n{'one image per call':<30} {'p50 ms':>8}")
    for name in fns:
        print(f"{name:<30} {latency[name]:>8.3f}")
    runner.deactivate()


def threaded_rate(fn: Callable[[], object], threads: int, seconds: float) -> float:
    """Calls per second of ``threads`` threads calling ``fn`` for ``seconds``."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def work(t: int) -> None:
        while time.perf_counter() < stop:
            fn()
            counts[t] += 1

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / seconds


def nncf_vs_qdq(ov, export_dir: Path, data: Path, threads: int, calib: int, rounds: int) -> None:
    import nncf

    from tl_deploy.formats.metadata import OnnxMetadata
    from tl_deploy.preprocess import prepare
    from tl_deploy.runtime.openvino_backend import OpenVinoRunner

    with OpenVinoRunner(export_dir / "model.onnx") as runner:
        metadata = OnnxMetadata.from_props(runner.custom_metadata())
    train = sorted((data / "train").rglob("*.*"))
    step = max(1, len(train) // calib)
    calib_batches = [prepare(path, metadata.spec)[None] for path in train[::step][:calib]]  # (1, 3, H, W) each
    core = ov.Core()
    start = time.perf_counter()
    quantized = nncf.quantize(core.read_model(str(export_dir / "model.onnx")), nncf.Dataset(calib_batches),
                              subset_size=len(calib_batches))
    print(f"\nNNCF {nncf.__version__}: quantized on {len(calib_batches)} train images in "
          f"{time.perf_counter() - start:.1f} s")
    models = {"QDQ model.int8.onnx": core.read_model(str(export_dir / "model.int8.onnx")), "NNCF INT8": quantized}
    requests = {name: core.compile_model(m, "CPU", compile_config(threads)).create_infer_request()
                for name, m in models.items()}
    test = [(path, metadata.class_names.index(path.parent.name)) for path in sorted((data / "test").rglob("*.*"))
            if path.parent.name in metadata.class_names]
    x = np.stack([prepare(path, metadata.spec) for path, _ in test])  # (N, 3, H, W)
    labels = np.array([label for _, label in test])
    one = np.ascontiguousarray(x[:1])
    latency = interleaved_p50({name: lambda r=r: r.infer({0: one}) for name, r in requests.items()}, rounds, 20)
    print(f"{'INT8 model':<22} {'test acc':>9} {'p50 ms b1':>10}")
    for name, request in requests.items():
        logits = np.concatenate([np.array(request.infer({0: x[i:i + 32]})[0]) for i in range(0, len(x), 32)])
        print(f"{name:<22} {100 * np.mean(logits.argmax(1) == labels):>8.2f}% {latency[name]:>10.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export_dir", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compiles", type=int, default=5, help="compiles per file for the median compile time")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--nncf", type=Path, metavar="DATA",
                   help="ImageFolder root: also time NNCF's INT8 (pip install nncf)")
    p.add_argument("--calib", type=int, default=512, help="NNCF calibration images (export --int8 uses 512)")
    args = p.parse_args()
    import openvino as ov

    print(f"OpenVINO {ov.__version__}, {args.threads} thread(s), {args.export_dir}")
    ir_vs_onnx(ov, args.export_dir, args.threads, args.compiles, args.rounds)
    batch1_graph(args.export_dir, args.threads, args.rounds)
    pool_vs_per_call(args.export_dir, args.threads, args.rounds)
    if args.nncf is not None:
        nncf_vs_qdq(ov, args.export_dir, args.nncf, args.threads, args.calib, args.rounds)


if __name__ == "__main__":
    main()
