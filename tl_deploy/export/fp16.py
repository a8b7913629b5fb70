"""Float32 ONNX -> FP16 ONNX: float16 weights and compute, float32 inputs and outputs.

TensorRT 11 builds FP16 engines only from a graph that is FP16 itself (``BuilderFlag.FP16`` is
gone), so FP16 is a property of the file: ``model.fp16.onnx``, which onnxruntime also runs (CPU and
CUDA). The conversion is onnxconverter-common's ``float16.convert_float_to_float16`` with
``keep_io_types``; docs/fp16.md has the measurements that chose it over NVIDIA ModelOpt's AutoCast.
Installed by the ``fp16`` extra: ``pip install 'tl_deploy[fp16]'``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_deploy.errors import BackendUnavailableError, ExportError
from tl_deploy.export.onnx import load_float32_source
from tl_deploy.fileio import atomic_path
from tl_deploy.formats.metadata import OnnxMetadata, embed_metadata

_logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tl_deploy[fp16]' (onnxconverter-common)"
CONVERTER = "onnxconverter-common float16, keep_io_types"  # recorded in export.json
# Initializer values float16 cannot hold are clamped to these by the converter (its defaults; float16
# tops out at 65504 and goes subnormal below 6e-5).
MIN_POSITIVE = 1e-7
MAX_FINITE = 1e4


@dataclass(frozen=True)
class Fp16Result:
    path: Path
    seconds: float
    fp16_nodes: int  # compute nodes (Casts excluded) whose outputs are float16
    fp32_nodes: dict[str, int]  # op type -> count of compute nodes left in float32


def import_float16() -> Any:
    """onnxconverter-common's float16 module, or a clear error saying how to install it."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise BackendUnavailableError(f"--fp16 needs onnxconverter-common, which is not installed: {INSTALL_HINT}.") \
            from exc
    return float16


def count_precisions(model: Any) -> tuple[int, dict[str, int]]:
    """(compute nodes with float16 outputs, {op type: nodes with float32 outputs}); Casts excluded."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    half, left = 0, Counter[str]()
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            continue
        outs = [types.get(out) for out in node.output]
        if onnx.TensorProto.FLOAT16 in outs:
            half += 1
        elif onnx.TensorProto.FLOAT in outs:
            left[node.op_type] += 1
    return half, dict(left)


def onnx_to_fp16_onnx(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Fp16Result:
    """Convert a float32 tl_deploy ONNX file to FP16 with float32 I/O; the metadata says ``fp16``."""
    import onnx

    float16 = import_float16()
    start = time.perf_counter()
    source = Path(onnx_path)
    model, metadata = load_float32_source(source, "convert to FP16")
    with warnings.catch_warnings():
        # One UserWarning per clamped initializer value: counted in the log below, not printed each.
        warnings.simplefilter("ignore", UserWarning)
        try:
            converted = float16.convert_float_to_float16(model, min_positive_val=MIN_POSITIVE,
                                                         max_finite_val=MAX_FINITE, keep_io_types=True)
        except Exception as exc:  # the converter raises bare ValueError/KeyError on graphs it cannot handle
            raise ExportError(f"FP16 conversion of {source} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    half, left = count_precisions(converted)
    embed_metadata(converted, metadata.replace(precision="fp16"))
    try:
        onnx.checker.check_model(converted, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"ONNX checker rejected the FP16 graph: {str(exc)[:300]}") from exc
    out = Path(out_path)
    with atomic_path(out) as tmp:
        onnx.save(converted, str(tmp))
    seconds = time.perf_counter() - start
    _logger.info("wrote %s (%d nodes FP16, FP32 left: %s, %.1f s)", out, half, left or "none", seconds)
    return Fp16Result(path=out, seconds=seconds, fp16_nodes=half, fp32_nodes=left)
