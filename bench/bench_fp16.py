"""Compare FP16 ONNX converters on a tl_deploy ONNX file: accuracy vs FP32, size, what stays FP32.

    python bench/bench_fp16.py export/<run>/model.onnx --data data/animal-shape [--limit 1000]
        [--converters autocast onnxconverter] [--threads 1] [--out bench/results/fp16.json]

Converters: ``autocast`` (NVIDIA ModelOpt, ``modelopt.onnx.autocast.convert_to_mixed_precision``,
low_precision_type fp16, keep_io_types) and ``onnxconverter`` (onnxconverter-common's
``float16.convert_float_to_float16``, keep_io_types). Each result runs on onnxruntime's CPU provider
with pinned threads; figures are printed as a table and written as JSON. Converters that are not
installed are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def convert_autocast(source: Path, dest: Path) -> None:
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    onnx.save(convert_to_mixed_precision(str(source), low_precision_type="fp16", keep_io_types=True), str(dest))


def convert_onnxconverter(source: Path, dest: Path) -> None:
    import onnx
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(dest))


CONVERTERS = {"autocast": convert_autocast, "onnxconverter": convert_onnxconverter}


def float32_nodes(path: Path) -> Counter[str]:
    """Op types of the compute nodes that still produce float32 (Casts excluded)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    return Counter(node.op_type for node in model.graph.node if node.op_type != "Cast"
                   and any(types.get(out) == onnx.TensorProto.FLOAT for out in node.output))


def run(path: Path, batch: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: batch[i:i + 32]})[0] for i in range(0, len(batch), 32)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx", type=Path, help="the FP32 tl_deploy ONNX file (model.onnx)")
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder with a test/ split")
    parser.add_argument("--limit", type=int, default=1000, help="test images (evenly spaced; default 1000)")
    parser.add_argument("--converters", nargs="+", default=list(CONVERTERS), choices=list(CONVERTERS))
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (pinned)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = parser.parse_args()

    from tl_deploy.formats.metadata import read_onnx_metadata
    from tl_deploy.parity import load_samples, preprocess_all

    metadata = read_onnx_metadata(str(args.onnx))
    samples = load_samples(args.data, "test", metadata.class_names, args.limit)
    batch = preprocess_all([p for p, _ in samples], metadata.spec)  # (N, 3, H, W)
    labels = np.array([label for _, label in samples])
    reference = run(args.onnx, batch, args.threads)
    rows: list[dict[str, Any]] = [{"converter": "none (FP32)", "size_mb": args.onnx.stat().st_size / 1e6,
                                   "accuracy": float((reference.argmax(1) == labels).mean())}]
    with tempfile.TemporaryDirectory(prefix="bench_fp16_") as tmp:
        for name in args.converters:
            dest = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            try:
                CONVERTERS[name](args.onnx, dest)
            except ImportError as exc:
                rows.append({"converter": name, "skipped": f"not installed ({exc})"})
                continue
            seconds = time.perf_counter() - start
            logits = run(dest, batch, args.threads)
            left = float32_nodes(dest)
            rows.append({
                "converter": name, "convert_s": seconds, "size_mb": dest.stat().st_size / 1e6,
                "max_abs_logit_diff": float(np.abs(logits - reference).max()),
                "mean_abs_logit_diff": float(np.abs(logits - reference).mean()),
                "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
                "accuracy": float((logits.argmax(1) == labels).mean()),
                "fp32_nodes": dict(left), "nodes": len(__import__("onnx").load(str(dest)).graph.node),
            })
    print(f"{len(samples)} test images of {args.data}, onnxruntime CPU, {args.threads} thread(s)")
    for row in rows:
        print(json.dumps(row))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"images": len(samples), "onnx": str(args.onnx), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
