"""ONNX -> TensorRT engine, plus the JSON sidecar that says where the engine may run.

Written against the TensorRT 10 Python API (type-checked with ``tensorrt-stubs``) and using only
what TensorRT 11 kept (checked against the 11.x bindings by ``tests/test_tensorrt_api.py``). A
serialized engine only loads on the TensorRT version and GPU model it was built with, so every
engine gets a sidecar ``<engine>.json``; ``check_sidecar`` is a pure function of that dict and the
current environment, and refuses foreign or tampered engines with a message that says how to rebuild.

Precision is a property of the ONNX file, as NVIDIA recommends since TensorRT 10 and requires from
TensorRT 11 (which removed ``BuilderFlag.FP16/INT8`` and weakly typed networks): every engine is
built from a strongly typed network, so ``model.onnx`` gives FP32, ``model.fp16.onnx`` (float16
weights and compute) FP16 and the QDQ ``model.int8.onnx`` explicitly quantized INT8, by one path.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_deploy.errors import ArtifactError, BackendUnavailableError, DataError, ExportError
from tl_deploy.export.metadata import FLOAT_NCHW, OnnxMetadata
from tl_deploy.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_file

_logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "tl_deploy.trt_engine"
SIDECAR_VERSION = 1
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PROFILE = "1:8:32"
DEFAULT_WORKSPACE_GB = 2.0
INSTALL_HINT = (
    "pip install 'tl_deploy[trt]' (TensorRT 10 or 11 and cuda-python from PyPI; needs an NVIDIA driver)"
)
_SIDECAR_FIELDS = ("format", "format_version", "tensorrt", "gpu", "compute_capability", "precision",
                   "profile", "onnx_sha256", "engine_sha256", "metadata")


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts (``min..max``) and the one it is tuned for (``opt``)."""

    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


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


# --------------------------------------------------------------------------- environment


def import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[attr-defined,no-redef]

        return cudart
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT backend needs cuda-python, which is not installed: {INSTALL_HINT}."
        ) from exc


def cuda_check(result: Any) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple, raising on any error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ExportError(f"CUDA call failed: {err}.")
    return values[0] if len(values) == 1 else tuple(values)


def require_tensorrt() -> None:
    """Check that TensorRT, cuda-python and a CUDA GPU are all present.

    Raises ``BackendUnavailableError`` (exit code 2) naming the first missing piece and how to
    install it. A ``tensorrt`` folder holding only type stubs does not count as TensorRT.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not installed (import tensorrt failed): {INSTALL_HINT}.") from exc
    if not hasattr(trt, "Builder"):
        raise BackendUnavailableError(
            f"TensorRT is not installed (only the 'tensorrt' type stubs were found): {INSTALL_HINT}."
        )
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise BackendUnavailableError(
            f"No CUDA GPU is usable ({err}): TensorRT needs an NVIDIA GPU and driver; "
            "run on a GPU machine or use the onnxruntime backend."
        )


def set_device(device: int) -> Any:
    """Make GPU ``device`` current for this thread (TensorRT builds and runs on the current device);
    returns the cudart module. Refuses an index this machine does not have."""
    cudart = import_cudart()
    count = cuda_check(cudart.cudaGetDeviceCount())
    if not 0 <= device < int(count):
        raise BackendUnavailableError(
            f"Invalid CUDA device {device}: this machine has {count} GPU(s), numbered 0..{int(count) - 1}."
        )
    cuda_check(cudart.cudaSetDevice(device))
    return cudart


def current_environment(device: int = 0) -> dict[str, str]:
    """TensorRT version and identity of GPU ``device`` (what a sidecar is checked against)."""
    require_tensorrt()
    import tensorrt as trt

    cudart = import_cudart()
    props = cuda_check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt": str(trt.__version__),
        "gpu": name.rstrip("\x00").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
    }


ORT_MIN_FOR_TENSORRT_11 = (1, 27)  # first onnxruntime whose TensorRT execution provider links TensorRT 11


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) if parts else (0, 0)


def ort_tensorrt_problem(ort_version: str, tensorrt_version: str | None) -> str | None:
    """Why onnxruntime's TensorRT execution provider cannot work with this TensorRT, or None (pure)."""
    if tensorrt_version is None or _major_minor(tensorrt_version)[0] < 11:
        return None
    if _major_minor(ort_version) >= ORT_MIN_FOR_TENSORRT_11:
        return None
    need = ".".join(map(str, ORT_MIN_FOR_TENSORRT_11))
    return (f"onnxruntime's TensorRT execution provider needs onnxruntime >= {need} for TensorRT 11; this machine "
            f"has onnxruntime {ort_version} with TensorRT {tensorrt_version}: pip install 'onnxruntime-gpu>={need}', "
            "or pip install 'tensorrt<11', or run the .engine file with the native TensorRT backend")


def check_ort_tensorrt_versions() -> None:
    """Refuse onnxruntime's TensorRT provider when the installed versions do not fit together."""
    import onnxruntime as ort

    try:
        import tensorrt as trt

        tensorrt_version: str | None = str(trt.__version__)
    except (ImportError, AttributeError):  # the provider reports a missing TensorRT itself
        tensorrt_version = None
    problem = ort_tensorrt_problem(str(ort.__version__), tensorrt_version)
    if problem:
        raise BackendUnavailableError(f"{problem}.")


# --------------------------------------------------------------------------- sidecar


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    return Path(f"{engine_path}.json")


def read_sidecar(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    import json

    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ArtifactError(
            f"{engine_path} has no sidecar {path.name}: its TensorRT version and GPU are unknown. "
            "Rebuild it with python -m tl_deploy.export MODEL_DIR --trt."
        )
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ArtifactError(f"Corrupt engine sidecar {path}: {exc}. Rebuild the engine.") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"Corrupt engine sidecar {path}: not a JSON object. Rebuild the engine.")
    return data


def check_sidecar(sidecar: Mapping[str, Any], env: Mapping[str, str], *, engine_sha256: str | None = None,
                  engine_name: str = "engine") -> OnnxMetadata:
    """Refuse an engine that was tampered with or built elsewhere; return its model metadata.

    Pure: depends only on the sidecar dict, the environment dict (``current_environment()``) and
    the engine file's sha256 (``None`` skips that check).
    """
    rebuild = ("Engines only load on the TensorRT version and GPU they were built with: rebuild it on this "
               "machine with python -m tl_deploy.export MODEL_DIR --trt (add --int8/--fp16 as before), "
               "or load the .onnx file with the onnxruntime backend.")
    missing = [key for key in _SIDECAR_FIELDS if key not in sidecar]
    if missing:
        raise ArtifactError(f"Engine sidecar of {engine_name} is incomplete (missing {missing}). {rebuild}")
    if sidecar["format"] != SIDECAR_FORMAT:
        raise ArtifactError(f"{engine_name}: sidecar format {sidecar['format']!r} is not {SIDECAR_FORMAT!r}.")
    if not isinstance(sidecar["format_version"], int) or sidecar["format_version"] > SIDECAR_VERSION:
        raise ArtifactError(f"{engine_name}: sidecar format {sidecar['format_version']} is newer than this "
                            f"tl_deploy understands ({SIDECAR_VERSION}). Upgrade tl_deploy.")
    if engine_sha256 is not None and sidecar["engine_sha256"] != engine_sha256:
        raise ArtifactError(
            f"{engine_name} does not match its sidecar (sha256 {engine_sha256[:12]}..., sidecar says "
            f"{str(sidecar['engine_sha256'])[:12]}...): the file was modified or replaced. {rebuild}"
        )
    built = (f"TensorRT {sidecar['tensorrt']} on {sidecar['gpu']} "
             f"(compute capability {sidecar['compute_capability']})")
    here = f"TensorRT {env.get('tensorrt')} on {env.get('gpu')} (compute capability {env.get('compute_capability')})"
    if (str(sidecar["tensorrt"]) != env.get("tensorrt") or str(sidecar["gpu"]) != env.get("gpu")
            or str(sidecar["compute_capability"]) != env.get("compute_capability")):
        raise ArtifactError(f"{engine_name} was built with {built}; this machine has {here}. {rebuild}")
    if not isinstance(sidecar["precision"], str) or sidecar["precision"] not in ENGINE_PRECISIONS:
        raise ArtifactError(f"{engine_name}: unknown precision {sidecar['precision']!r} in its sidecar. {rebuild}")
    if not isinstance(sidecar["metadata"], Mapping):
        raise ArtifactError(f"{engine_name}: the sidecar's metadata is not a JSON object. {rebuild}")
    return OnnxMetadata.from_dict(sidecar["metadata"], origin=f"{engine_name} sidecar")


def make_sidecar(*, env: Mapping[str, str], precision: str, profile: BatchProfile, input_name: str,
                 input_shape: tuple[int, ...], workspace_bytes: int, strongly_typed: bool, onnx_file: str,
                 onnx_sha256: str, engine_sha256: str, metadata: OnnxMetadata, build_seconds: float) -> dict[str, Any]:
    """The sidecar dict written next to an engine (pure)."""
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "tensorrt": env["tensorrt"],
        "gpu": env["gpu"],
        "compute_capability": env["compute_capability"],
        "precision": precision,
        "strongly_typed": strongly_typed,
        "profile": {**profile.to_dict(), "input": input_name, "shape": list(input_shape)},
        "workspace_bytes": workspace_bytes,
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
        "engine_sha256": engine_sha256,
        "metadata": metadata.to_dict(),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 2),
    }


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

    from tl_deploy.export.metadata import read_onnx_metadata

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
    if precision not in ENGINE_PRECISIONS:
        raise ExportError(f"{source} has precision {precision!r}; engines are built from "
                          f"{', '.join(ENGINE_PRECISIONS)} ONNX files.")

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
