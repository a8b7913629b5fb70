"""Export a model artifact: ONNX FP32 first, then FP16 / INT8 ONNX and TensorRT engines from them.

Each format is a pure converter named by input and output (``torch_to_onnx``, ``onnx_to_fp16_onnx``,
``onnx_to_int8_onnx``, ``onnx_to_engine``); ``export_artifact`` only orchestrates them, checks
every result, and writes the folder atomically with an ``export.json`` manifest (see
export/README.md). Heavy libraries (torch, onnx, onnxruntime, tensorrt) are imported inside the
functions that need them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy import __version__
from tl_deploy.errors import DataError, ExportError
from tl_deploy.export.fp16 import CONVERTER as FP16_CONVERTER
from tl_deploy.export.fp16 import import_float16, onnx_to_fp16_onnx
from tl_deploy.export.onnx import DEFAULT_OPSET, simplify_available, torch_to_onnx
from tl_deploy.export.quantize import (
    DEFAULT_CALIB_SAMPLES,
    QuantizationConfig,
    calibration_batches,
    onnx_to_int8_onnx,
    select_calibration_images,
)
from tl_deploy.export.tensorrt import DEFAULT_WORKSPACE_GB, onnx_to_engine
from tl_deploy.fileio import atomic_dir, atomic_write_json, check_output_folder, check_output_writable, sha256_file
from tl_deploy.formats.engine_sidecar import BatchProfile
from tl_deploy.formats.export_manifest import make_export_manifest
from tl_deploy.formats.metadata import OnnxMetadata, read_onnx_metadata
from tl_deploy.formats.names import (
    BAKED_FILE,
    EXPORT_MANIFEST,
    FLOAT_NCHW,
    FP16_FILE,
    FP32_FILE,
    INT8_CPU_FILE,
    INT8_FILE,
    UINT8_NHWC,
    engine_file,
)
from tl_deploy.runtime.gpu import require_tensorrt, set_device

__all__ = [
    "ExportOptions", "ExportRow", "OnnxMetadata", "export_artifact", "onnx_to_engine", "onnx_to_fp16_onnx",
    "onnx_to_int8_onnx", "read_onnx_metadata", "torch_to_onnx",
]

_logger = logging.getLogger(__name__)

HOLDOUT_IMAGES = 64  # images kept out of calibration to check INT8 agreement
PARITY_TOL = 1e-3  # max |ONNX - torch| logit difference accepted at export time
INT8_MIN_AGREEMENT = 0.98  # below this top-1 agreement with FP32 the export warns (parity's int8 default)
# FP16 keeps ~3 significant digits: max |FP16 - FP32| logit difference accepted at export time, for the
# FP16 ONNX file vs model.onnx and an FP16 engine vs model.fp16.onnx. docs/fp16.md: 0.05 measured.
FP16_TOL = 0.25
# An INT8 engine vs the QDQ file run as written: the same integer arithmetic, so top-1 should agree;
# this catches a wrong engine (NVIDIA/TensorRT#4813), while parity judges INT8 accuracy.
ENGINE_INT8_MIN_AGREEMENT = 0.95


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how (the CLI flags, typed)."""

    int8: bool = False  # INT8 ONNX files (and an INT8 engine with trt)
    trt: bool = False  # TensorRT engine(s)
    fp16: bool = False  # model.fp16.onnx (and an FP16 engine with trt)
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"  # torch.onnx exporter: torchscript (fast, opset 17) or dynamo
    bake_preprocess: bool = False  # also write a uint8 NHWC graph with normalisation inside
    simplify: bool | None = None  # onnxslim; None: when installed
    calib_data: Path | None = None  # calibration images; None: the artifact's training data
    calib_samples: int = DEFAULT_CALIB_SAMPLES  # at most this many calibration images
    calib_method: str = "minmax"
    int8_cpu: bool = True  # with int8: also write the CPU-tuned INT8 file
    batch: BatchProfile = BatchProfile(1, 8, 32)  # TensorRT optimization profile
    workspace_gb: float = DEFAULT_WORKSPACE_GB  # TensorRT workspace pool limit
    timing_cache: Path | None = None  # None: <out>/../trt_timing.cache, shared by builds
    device: int = 0  # CUDA device index for TensorRT builds and their checks
    verify: bool = True  # check the artifact's checksums before exporting
    seed: int = 0  # calibration image pick


@dataclass
class ExportRow:
    """One written file: a row of the printed table and an entry of export.json."""

    format: str  # human label, e.g. "ONNX FP32"
    file: str
    kind: str  # "onnx" or "engine"
    precision: str
    input_layout: str
    target: str  # "any", "cpu" or "tensorrt"
    seconds: float
    status: str = "ok"
    check: str = ""  # what was verified, e.g. "max|dlogit| 2e-06 vs torch"
    size_bytes: int = 0
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "file": self.file, "kind": self.kind, "precision": self.precision,
                "input_layout": self.input_layout, "target": self.target, "status": self.status,
                "check": self.check, "size_bytes": self.size_bytes, "sha256": self.sha256,
                "build_seconds": round(self.seconds, 2), **self.extra}


def resolve_calibration_dir(model_dir: Path, config: dict[str, Any], calib_data: Path | None) -> Path:
    """``--calib-data`` if given, else the artifact's ``training.data``; refuses what does not exist."""
    if calib_data is not None:
        path = Path(calib_data)
        origin = "--calib-data"
    else:
        data = (config.get("training") or {}).get("data")
        if not data:
            raise DataError(
                f"{model_dir}/config.json records no training data (training.data): INT8 needs real "
                "images, pass --calib-data DIR."
            )
        path = Path(str(data))
        origin = f"training.data of {model_dir}"
    if not path.is_dir():
        raise DataError(f"Calibration folder {path} ({origin}) not found: pass --calib-data DIR with real images.")
    return path


def _onnx_parity(proto_path: Path, model: Any, batch: np.ndarray) -> float:
    """Max |logit| difference between onnxruntime and torch on ``batch`` (N, 3, H, W)."""
    import torch

    onnx_out = _onnx_logits(proto_path, batch)
    with torch.inference_mode():
        torch_out = model(torch.from_numpy(batch)).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def _onnx_logits(path: Path, batch: np.ndarray, *, as_written: bool = False) -> np.ndarray:
    """(N, C) logits of an ONNX file on onnxruntime's CPU provider; ``as_written``: no graph fusion."""
    from tl_deploy.runtime.onnxruntime_backend import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], optimize=not as_written) as runner:
        return runner.infer(batch)


def _check_fp16_onnx(fp16: Path, fp32: Path, batch: np.ndarray, what: str) -> str:
    """Max |logit| difference of the FP16 file vs model.onnx, refused above ``FP16_TOL``."""
    reference = _onnx_logits(fp32, batch)
    logits = _onnx_logits(fp16, batch)
    diff = float(np.abs(logits - reference).max())
    agree = float((logits.argmax(1) == reference.argmax(1)).mean())
    if not diff <= FP16_TOL:  # NaN fails too
        raise ExportError(f"{fp16.name} logits differ from {fp32.name} by {diff:.2e} (> {FP16_TOL}) on {what}: "
                          "the FP16 conversion is wrong for this model; export without --fp16.")
    return f"max|dlogit| {diff:.1e} vs {fp32.name}, top-1 agrees {agree:.0%} on {what}"


def _check_engine(engine_path: Path, source: Path, batch: np.ndarray, what: str, device: int) -> str:
    """Logits of a built engine vs the ONNX file it was built from, with the precision's tolerance.

    Run after every build: a strongly typed TensorRT 11.1 FP32 engine was reported to give silently
    wrong outputs (NVIDIA/TensorRT#4813), so an engine is only written when it agrees with its source.
    """
    from tl_deploy.runtime import tensorrt_backend

    with tensorrt_backend.load_engine(engine_path, device=device) as engine:
        logits = engine.infer(batch)
        precision = engine.precision
    reference = _onnx_logits(source, batch, as_written=precision == "int8")
    diff = float(np.abs(logits - reference).max())
    agree = float((logits.argmax(1) == reference.argmax(1)).mean())
    found = f"max|dlogit| {diff:.1e}, top-1 agrees {agree:.0%} vs {source.name} on {what}"
    if precision == "int8":
        wrong = not agree >= ENGINE_INT8_MIN_AGREEMENT
        limit = f"top-1 agreement under {ENGINE_INT8_MIN_AGREEMENT:.0%}"
    else:
        tol = PARITY_TOL if precision == "fp32" else FP16_TOL
        wrong = not diff <= tol  # NaN is wrong too
        limit = f"max|dlogit| over {tol}"
    if wrong:
        raise ExportError(f"TensorRT {precision.upper()} engine is wrong ({found}: {limit}); nothing was written. "
                          "Try another TensorRT version, or use the ONNX files with onnxruntime.")
    return found


def _top1_agreement(int8_path: Path, fp32_path: Path, batch: np.ndarray, exact_integer: bool) -> float:
    """Share of images whose top-1 class is the same in the INT8 and FP32 files.

    ``exact_integer`` disables onnxruntime's QDQ fusion, so Q/DQ run as written: the arithmetic
    TensorRT performs for an explicitly quantized graph.
    """
    int8_top1 = _onnx_logits(int8_path, batch, as_written=exact_integer).argmax(1)
    return float((int8_top1 == _onnx_logits(fp32_path, batch).argmax(1)).mean())


def _finish(row: ExportRow, path: Path) -> ExportRow:
    row.size_bytes = path.stat().st_size
    row.sha256 = sha256_file(path)
    return row


def _export_int8(fp32: Path, folder: Path, calib_paths: list[Path], holdout: np.ndarray | None, held_out: int,
                 calib_source: str, spec: Any, options: ExportOptions) -> list[ExportRow]:
    """INT8 QDQ file for TensorRT (+ the CPU-tuned file), sharing one calibration pass.

    ``holdout``: the images the INT8 top-1 check runs on; ``held_out``: 0 when they are calibration
    images (too few images to keep any out), which the check line then says."""
    batches = list(calibration_batches(calib_paths, spec))
    targets = [("tensorrt", INT8_FILE, "ONNX INT8 QDQ")]
    if options.int8_cpu:
        targets.append(("cpu", INT8_CPU_FILE, "ONNX INT8 CPU"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="tl_deploy_calib_") as cache_dir:
        for target, name, label in targets:
            if target == targets[0][0]:
                _logger.info("%s: calibrating on %d images from %s (%s)", label, len(calib_paths), calib_source,
                             options.calib_method)
            else:
                _logger.info("%s: reusing the calibration ranges", label)
            result = onnx_to_int8_onnx(fp32, folder / name, batches,
                                       config=QuantizationConfig(target=target, method=options.calib_method,
                                                                 float_first_conv=target == "tensorrt"),
                                       calibration_source=calib_source,
                                       calibration_cache=Path(cache_dir) / "ranges.json")
            check = "not checked: no calibration images"
            if holdout is not None:
                agree = _top1_agreement(result.path, fp32, holdout, exact_integer=target == "tensorrt")
                how = "exact int8 math" if target == "tensorrt" else "onnxruntime CPU"
                which = "held-out" if held_out else "calibration images (too few images to hold any out)"
                check = f"top-1 agrees {agree:.0%} on {len(holdout)} {which} ({how})"
                if agree < INT8_MIN_AGREEMENT:
                    _logger.warning("%s: %s, below the %.0f%% parity asks for: run python -m tl_deploy.parity "
                                    "before using it", name, check, 100 * INT8_MIN_AGREEMENT)
            rows.append(_finish(ExportRow(label, name, "onnx", "int8", FLOAT_NCHW, target, result.seconds,
                                          check=check), result.path))
    return rows


@dataclass
class CheckImages:
    """The inputs an export checks its files on: real images when the artifact names its data, else
    seeded noise; and the calibration images of an INT8 export."""

    probe: np.ndarray  # (n, 3, H, W): ONNX FP32 vs PyTorch
    checks: np.ndarray  # (n, 3, H, W): FP16 and engine checks
    checked_on: str  # "64 held-out images" or "16 noise inputs", for the check lines
    holdout: np.ndarray | None = None  # the INT8 top-1 check images (None: no images)
    held_out: int = 0  # how many of them were kept out of calibration (0: calibration images)
    calib_paths: list[Path] = field(default_factory=list)


def check_images(calib_dir: Path | None, check_dir: Path | None, spec: Any, options: ExportOptions) -> CheckImages:
    """Pick the calibration and check images (``calib_dir`` with --int8, else ``check_dir`` or none)."""
    holdout: np.ndarray | None = None
    held_out = 0
    calib_paths: list[Path] = []
    if calib_dir is not None:
        picked = select_calibration_images(calib_dir, options.calib_samples, options.seed, holdout=HOLDOUT_IMAGES)
        # Calibration gets its full share first; the INT8 check uses what is left, or (none left)
        # calibration images themselves, and says so: never skipped without a word.
        calib_paths, hold_paths = picked[:options.calib_samples], picked[options.calib_samples:]
        check_paths = hold_paths or calib_paths[:HOLDOUT_IMAGES]
        holdout = np.concatenate(list(calibration_batches(check_paths, spec)))
        held_out = len(hold_paths)
    elif check_dir is not None:
        hold_paths = select_calibration_images(check_dir, HOLDOUT_IMAGES, options.seed)
        holdout = np.concatenate(list(calibration_batches(hold_paths, spec)))
    size = spec.input_size
    if holdout is not None:
        return CheckImages(holdout[:8], holdout, f"{len(holdout)} held-out images", holdout, held_out, calib_paths)
    noise = np.random.default_rng(0).standard_normal((16, 3, size, size)).astype(np.float32)
    probe = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    return CheckImages(probe, noise, f"{len(noise)} noise inputs", None, 0, calib_paths)


def _refuse_before_work(model_dir: Path, out: Path, options: ExportOptions) -> tuple[Path | None, Path | None]:
    """Everything that can be refused, before any work; returns (calibration dir, check-image dir)."""
    from tl_deploy.artifact import read_config

    if options.calib_samples <= 0:
        raise DataError(f"Invalid --calib-samples {options.calib_samples}: choose a positive number.")
    if options.fp16:
        import_float16()
    if options.trt:
        require_tensorrt()
        set_device(options.device)
    config = read_config(model_dir)
    calib_dir = resolve_calibration_dir(model_dir, config, options.calib_data) if options.int8 else None
    check_output_folder(out, "export", inputs={"model artifact": model_dir, "calibration data": calib_dir})
    check_output_writable(out)
    check_dir = calib_dir
    if check_dir is None and (options.fp16 or options.trt):
        try:  # the FP16 and engine checks use real images when the artifact names its data
            check_dir = resolve_calibration_dir(model_dir, config, options.calib_data)
        except DataError as exc:
            _logger.info("FP16/TensorRT checks run on seeded noise: %s", exc)
    return calib_dir, check_dir


def _export_fp32(artifact: Any, folder: Path, metadata: OnnxMetadata, images: CheckImages, simplify: bool,
                 options: ExportOptions) -> ExportRow:
    """model.onnx, refused when its logits differ from PyTorch's by more than ``PARITY_TOL``."""
    _logger.info("ONNX FP32: exporting %s (opset %d, %s exporter)", artifact.architecture.name, options.opset,
                 options.exporter)
    start = time.perf_counter()
    fp32 = torch_to_onnx(artifact.model, folder / FP32_FILE, metadata=metadata, opset=options.opset,
                         simplify=simplify, exporter=options.exporter)
    diff = _onnx_parity(fp32, artifact.model, images.probe)
    if diff > PARITY_TOL:
        raise ExportError(f"ONNX logits differ from PyTorch by {diff:.2e} (> {PARITY_TOL}): export is wrong.")
    return _finish(ExportRow("ONNX FP32", FP32_FILE, "onnx", "fp32", FLOAT_NCHW, "any", time.perf_counter() - start,
                             check=f"max|dlogit| {diff:.1e} vs torch"), fp32)


def _export_baked(artifact: Any, folder: Path, metadata: OnnxMetadata, simplify: bool,
                  options: ExportOptions) -> ExportRow:
    """model.preprocess.onnx: uint8 NHWC images in, the normalisation inside the graph."""
    start = time.perf_counter()
    baked = torch_to_onnx(artifact.model, folder / BAKED_FILE, metadata=metadata, opset=options.opset,
                          bake_preprocess=True, simplify=simplify, exporter=options.exporter)
    return _finish(ExportRow("ONNX FP32 uint8-in", BAKED_FILE, "onnx", "fp32", UINT8_NHWC, "any",
                             time.perf_counter() - start, check="normalisation in graph"), baked)


def _export_fp16(fp32: Path, folder: Path, images: CheckImages) -> ExportRow:
    """model.fp16.onnx, checked against model.onnx."""
    _logger.info("ONNX FP16: converting %s (%s)", FP32_FILE, FP16_CONVERTER)
    half = onnx_to_fp16_onnx(fp32, folder / FP16_FILE)
    check = _check_fp16_onnx(half.path, fp32, images.checks, images.checked_on)
    return _finish(ExportRow("ONNX FP16", FP16_FILE, "onnx", "fp16", FLOAT_NCHW, "any", half.seconds, check=check,
                             extra={"converter": FP16_CONVERTER, "fp16_nodes": half.fp16_nodes,
                                    "fp32_nodes": half.fp32_nodes}), half.path)


def _build_engines(folder: Path, out: Path, images: CheckImages, options: ExportOptions) -> list[ExportRow]:
    """One TensorRT engine per ONNX precision asked for, each checked against its source file."""
    cache = options.timing_cache or out.parent / "trt_timing.cache"
    # One build path: the engine's precision is its ONNX file's (strongly typed network).
    builds = ([("int8", folder / INT8_FILE)] if options.int8 else []) + \
             ([("fp16", folder / FP16_FILE)] if options.fp16 else []) + \
             ([("fp32", folder / FP32_FILE)] if not (options.int8 or options.fp16) else [])
    rows = []
    for precision, source in builds:
        name = engine_file(precision)
        _logger.info("TensorRT %s: building %s from %s (batch %s)", precision.upper(), name, source.name,
                     options.batch)
        engine = onnx_to_engine(source, folder / name, profile=options.batch,
                                workspace_bytes=int(options.workspace_gb * (1 << 30)), timing_cache=cache,
                                device=options.device)
        check = _check_engine(engine.path, source, images.checks, images.checked_on, options.device)
        rows.append(_finish(ExportRow(f"TensorRT {precision.upper()}", name, "engine", precision, FLOAT_NCHW,
                                      "tensorrt", engine.seconds,
                                      check=f"{engine.sidecar['gpu']}, batch {options.batch}, {check}",
                                      extra={"source": source.name}), engine.path))
    return rows


def _write_manifest(folder: Path, model_dir: Path, artifact: Any, metadata: OnnxMetadata, rows: list[ExportRow],
                    images: CheckImages, simplify: bool, options: ExportOptions) -> None:
    from tl_deploy.artifact import package_versions

    atomic_write_json(folder / EXPORT_MANIFEST, make_export_manifest(
        tl_deploy_version=__version__,
        source={"path": str(model_dir), "checksum": artifact.checksum, "architecture": artifact.architecture.name},
        metadata=metadata.to_dict(),
        options={"opset": options.opset, "exporter": options.exporter, "simplify": simplify,
                 "calib_method": options.calib_method, "calib_images": len(images.calib_paths),
                 "batch": str(options.batch)},
        versions=package_versions(),
        files=[row.to_dict() for row in rows],
    ))


def export_artifact(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    options: ExportOptions = ExportOptions()) -> list[ExportRow]:
    """Export ``model_dir`` into ``out_dir`` (built aside, then moved into place); return the rows.

    Everything that can be refused is refused before any work: a missing TensorRT/GPU for ``trt``
    (``BackendUnavailableError``, exit code 2), missing calibration data for ``int8``.
    """
    from tl_deploy.artifact import load_artifact

    model_dir, out = Path(model_dir), Path(out_dir)
    calib_dir, check_dir = _refuse_before_work(model_dir, out, options)
    simplify = simplify_available() if options.simplify is None else options.simplify
    if options.simplify is None and not simplify:
        _logger.info("onnxslim not installed: graph left unsimplified (pip install 'tl_deploy[simplify]')")

    artifact = load_artifact(model_dir, verify=options.verify)
    metadata = artifact.onnx_metadata()
    with atomic_dir(out) as tmp:
        images = check_images(calib_dir, check_dir, artifact.spec, options)
        rows = [_export_fp32(artifact, tmp, metadata, images, simplify, options)]
        if options.bake_preprocess:
            rows.append(_export_baked(artifact, tmp, metadata, simplify, options))
        if options.fp16:
            rows.append(_export_fp16(tmp / FP32_FILE, tmp, images))
        if options.int8:
            rows.extend(_export_int8(tmp / FP32_FILE, tmp, images.calib_paths, images.holdout, images.held_out,
                                     str(calib_dir), artifact.spec, options))
        if options.trt:
            rows.extend(_build_engines(tmp, out, images, options))
        _write_manifest(tmp, model_dir, artifact, metadata, rows, images, simplify, options)
    _logger.info("wrote export folder %s", out)
    return rows


def format_table(rows: list[ExportRow]) -> str:
    """The table printed after an export: format, file, size MB, build time, status."""
    header = ("format", "file", "size MB", "build s", "status")
    lines = [(r.format, r.file, f"{r.size_bytes / 1e6:.2f}", f"{r.seconds:.1f}",
              r.status + (f" ({r.check})" if r.check else "")) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*line) for line in lines)])
