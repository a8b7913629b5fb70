"""ONNX -> TensorRT engine, plus the JSON sidecar that says where the engine may run.

Written against the TensorRT 10 Python API (type-checked with ``tensorrt-stubs``) and using only
what TensorRT 11 kept (checked against the 11.x bindings by ``tests/test_tensorrt_api.py``). A
serialized engine only loads on the TensorRT version and GPU model it was built with, so every
engine gets a sidecar ``<engine>.json``, written here with ``formats.engine_sidecar.make_sidecar``
and checked where it is loaded (``check_sidecar``). What this machine has (TensorRT, cuda-python,
the GPU) is probed by ``runtime.gpu``.

Precision is a property of the ONNX file, as NVIDIA recommends since TensorRT 10 and requires from
TensorRT 11 (which removed ``BuilderFlag.FP16/INT8`` and weakly typed networks): every engine is
built from a strongly typed network, so ``model.onnx`` gives FP32, ``model.fp16.onnx`` (float16
weights and compute) FP16 and the QDQ ``model.int8.onnx`` explicitly quantized INT8, by one path.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_deploy.errors import DataError, ExportError
from tl_deploy.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from tl_deploy.formats.engine_sidecar import BatchProfile, make_sidecar, sidecar_path
from tl_deploy.formats.metadata import OnnxMetadata, read_onnx_metadata
from tl_deploy.formats.names import FLOAT_NCHW, PRECISIONS
from tl_deploy.runtime.gpu import current_environment, require_tensorrt, set_device

_logger = logging.getLogger(__name__)

DEFAULT_PROFILE = "1:8:32"
DEFAULT_WORKSPACE_GB = 2.0


def parse_batch_profile(text: str) -> BatchProfile:
    """``"1:8:32"`` -> BatchProfile(1, 8, 32); a single ``"8"`` means a fixed batch of 8."""
    parts = text.strip().split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        raise DataError(f"Invalid --batch {text!r}: use MIN:OPT:MAX with positive integers, e.g. 1:8:32.")
    low, opt, high = (int(p) for p in parts)
    if not 1 <= low <= opt <= high:
        raise DataError(f"Invalid --batch {text!r}: need 1 <= MIN <= OPT <= MAX, e.g. 1:8:32.")
    if high > 4096:
        raise DataError(f"Invalid --batch {text!r}: MAX {high} is over 4096; pick a realistic serving batch.")
    return BatchProfile(low, opt, high)


def input_shape_for(metadata: OnnxMetadata, batch: int) -> tuple[int, int, int, int]:
    """The engine input shape at a batch size: (B, 3, H, W) or (B, H, W, 3) for baked graphs."""
    size = metadata.spec.input_size
    return (batch, 3, size, size) if metadata.input_layout == FLOAT_NCHW else (batch, size, size, 3)


# --------------------------------------------------------------------------- converter


@dataclass(frozen=True)
class EngineResult:
    path: Path
    sidecar: dict[str, Any]
    seconds: float


def onnx_to_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    profile: BatchProfile = BatchProfile(1, 8, 32),
    workspace_bytes: int = int(DEFAULT_WORKSPACE_GB * (1 << 30)),
    timing_cache: str | os.PathLike[str] | None = None,
    device: int = 0,
) -> EngineResult:
    """Build a serialized TensorRT engine from a tl_deploy ONNX file and write it with its sidecar.

    The engine's precision is the file's: ``model.onnx`` gives FP32, ``model.fp16.onnx`` FP16 and the
    QDQ ``model.int8.onnx`` INT8, all from a strongly typed network (the one kind TensorRT 11 builds).
    ``timing_cache`` is read if present and updated after the build, so later builds (other
    precisions, other profiles) skip kernel timing they already did. ``device``: the GPU index.
    """
    require_tensorrt()
    import tensorrt as trt  # typed by tensorrt-stubs, so mypy checks every call below

    set_device(device)
    env = current_environment(device)
    start = time.perf_counter()
    source = Path(onnx_path)
    if not source.is_file():
        raise ExportError(f"ONNX file not found: {source}. Export it first with python -m tl_deploy.export.")
    metadata = read_onnx_metadata(str(source))
    if workspace_bytes <= 0:
        raise ExportError(f"Invalid workspace {workspace_bytes} bytes: choose a positive size (e.g. 2 GiB).")
    precision = metadata.precision
    if precision not in PRECISIONS:
        raise ExportError(f"{source} has precision {precision!r}; engines are built from "
                          f"{', '.join(PRECISIONS)} ONNX files.")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Types follow the ONNX graph. TensorRT 11 builds only strongly typed networks (and ignores the
    # flag); TensorRT 10 needs it, or it would pick layer precisions itself.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {source}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    # TensorRT may run FP32 tensors in TF32 (10-bit mantissa) on Ampere and newer GPUs; FP32 stays
    # FP32 here (the FP32 engine, and the layers an FP16/INT8 file keeps in FP32), so the engine
    # matches its ONNX file within the export check's tolerance.
    config.clear_flag(trt.BuilderFlag.TF32)
    input_name = network.get_input(0).name
    trt_profile = builder.create_optimization_profile()
    low, opt, high = (trt.Dims(list(input_shape_for(metadata, b))) for b in (profile.min, profile.opt, profile.max))
    trt_profile.set_shape(input_name, low, opt, high)
    config.add_optimization_profile(trt_profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        _logger.warning("timing cache %s does not fit this TensorRT/GPU; starting a fresh one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {source} ({precision}, batch {profile}); "
            "see the TensorRT log above. Try a larger --workspace-gb or a smaller --batch MAX."
        )
    out = Path(engine_path)
    atomic_write_bytes(out, bytes(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - start
    sidecar = make_sidecar(
        env=env, precision=precision, profile=profile, input_name=input_name,
        input_shape=input_shape_for(metadata, -1), workspace_bytes=workspace_bytes,
        strongly_typed=True, onnx_file=source.name, onnx_sha256=sha256_file(source),
        engine_sha256=sha256_file(out), metadata=metadata, build_seconds=seconds,
    )
    atomic_write_json(sidecar_path(out), sidecar)
    _logger.info("wrote %s (%s, batch %s, %.1f s)", out, precision, profile, seconds)
    return EngineResult(path=out, sidecar=sidecar, seconds=seconds)
