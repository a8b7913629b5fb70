"""Export a model artifact: ONNX FP32 first, then INT8 ONNX and TensorRT engines from it.

Each format is a pure converter named by input and output (``torch_to_onnx``,
``onnx_to_int8_onnx``, ``onnx_to_engine``); ``export_artifact`` only orchestrates them, checks
every result, and writes the folder atomically with an ``export.json`` manifest (see
export/README.md). Heavy libraries (torch, onnx, onnxruntime, tensorrt) are imported inside the
functions that need them.
"""

from __future__ import annotations

import datetime as _dt
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
from tl_deploy.export.metadata import FLOAT_NCHW, UINT8_NHWC, OnnxMetadata, read_onnx_metadata
from tl_deploy.export.onnx import DEFAULT_OPSET, simplify_available, torch_to_onnx
from tl_deploy.export.quantize import (
    DEFAULT_CALIB_SAMPLES,
    QuantizationConfig,
    calibration_batches,
    onnx_to_int8_onnx,
    select_calibration_images,
)
from tl_deploy.export.tensorrt import (
    DEFAULT_WORKSPACE_GB,
    BatchProfile,
    onnx_to_engine,
    require_tensorrt,
)
from tl_deploy.fileio import atomic_dir, atomic_write_json, check_output_folder, check_output_writable, sha256_file

__all__ = [
    "ExportOptions", "ExportRow", "OnnxMetadata", "export_artifact", "onnx_to_engine", "onnx_to_int8_onnx",
    "read_onnx_metadata", "torch_to_onnx",
]

_logger = logging.getLogger(__name__)

MANIFEST = "export.json"
MANIFEST_FORMAT = "tl_deploy.export"
FP32_FILE = "model.onnx"
BAKED_FILE = "model.preprocess.onnx"
INT8_FILE = "model.int8.onnx"  # QDQ, symmetric: TensorRT explicit quantization (runs on onnxruntime too)
INT8_CPU_FILE = "model.int8.cpu.onnx"  # tuned for onnxruntime on x86 CPUs
HOLDOUT_IMAGES = 64  # images kept out of calibration to check INT8 agreement
PARITY_TOL = 1e-3  # max |ONNX - torch| logit difference accepted at export time


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how (the CLI flags, typed)."""

    int8: bool = False  # INT8 ONNX files (and an INT8 engine with trt)
    trt: bool = False  # TensorRT engine(s)
    fp16: bool = False  # FP16 TensorRT engine (with trt)
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
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(proto_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.inference_mode():
        torch_out = model(torch.from_numpy(batch)).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def _top1_agreement(int8_path: Path, fp32_path: Path, batch: np.ndarray, exact_integer: bool) -> float:
    """Share of images whose top-1 class is the same in the INT8 and FP32 files.

    ``exact_integer`` disables onnxruntime's QDQ fusion, so Q/DQ run as written: the arithmetic
    TensorRT performs for an explicitly quantized graph.
    """
    import onnxruntime as ort

    def top1(path: Path, level: Any) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {session.get_inputs()[0].name: batch})[0]).argmax(1)

    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact_integer else \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return float((top1(int8_path, level) == top1(fp32_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)).mean())


def _finish(row: ExportRow, path: Path) -> ExportRow:
    row.size_bytes = path.stat().st_size
    row.sha256 = sha256_file(path)
    return row


def _export_int8(fp32: Path, folder: Path, calib_paths: list[Path], holdout: np.ndarray | None,
                 calib_source: str, spec: Any, options: ExportOptions) -> list[ExportRow]:
    """INT8 QDQ file for TensorRT (+ the CPU-tuned file), sharing one calibration pass."""
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
            check = ""
            if holdout is not None:
                agree = _top1_agreement(result.path, fp32, holdout, exact_integer=target == "tensorrt")
                how = "exact int8 math" if target == "tensorrt" else "onnxruntime CPU"
                check = f"top-1 agrees {agree:.0%} on {len(holdout)} held-out ({how})"
            rows.append(_finish(ExportRow(label, name, "onnx", "int8", FLOAT_NCHW, target, result.seconds,
                                          check=check), result.path))
    return rows


def export_artifact(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    options: ExportOptions = ExportOptions()) -> list[ExportRow]:
    """Export ``model_dir`` into ``out_dir`` (built aside, then moved into place); return the rows.

    Everything that can be refused is refused before any work: a missing TensorRT/GPU for ``trt``
    (``BackendUnavailableError``, exit code 2), missing calibration data for ``int8``.
    """
    from tl_deploy.artifact import load_artifact, read_config

    model_dir, out = Path(model_dir), Path(out_dir)
    if options.fp16 and not options.trt:
        raise ExportError("--fp16 applies to TensorRT engines: add --trt (ONNX files stay FP32/INT8).")
    if options.calib_samples <= 0:
        raise DataError(f"Invalid --calib-samples {options.calib_samples}: choose a positive number.")
    if options.trt:
        require_tensorrt()
    config = read_config(model_dir)
    calib_dir = resolve_calibration_dir(model_dir, config, options.calib_data) if options.int8 else None
    check_output_folder(out, "export", inputs={"model artifact": model_dir, "calibration data": calib_dir})
    check_output_writable(out)
    simplify = simplify_available() if options.simplify is None else options.simplify
    if options.simplify is None and not simplify:
        _logger.info("onnxslim not installed: graph left unsimplified (pip install 'tl_deploy[simplify]')")

    artifact = load_artifact(model_dir, verify=options.verify)
    metadata = OnnxMetadata.from_artifact(artifact)
    rows: list[ExportRow] = []
    with atomic_dir(out) as tmp:
        # Sample inputs for the checks: real images when we have them, else seeded noise.
        holdout: np.ndarray | None = None
        calib_paths: list[Path] = []
        if calib_dir is not None:
            picked = select_calibration_images(calib_dir, options.calib_samples + HOLDOUT_IMAGES, options.seed)
            # Calibration gets its full share first; the held-out check uses what is left, if any.
            calib_paths, hold_paths = picked[:options.calib_samples], picked[options.calib_samples:]
            if hold_paths:
                holdout = np.concatenate(list(calibration_batches(hold_paths, artifact.spec)))
        size = artifact.spec.input_size
        probe = holdout[:8] if holdout is not None else \
            np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)

        _logger.info("ONNX FP32: exporting %s (opset %d, %s exporter)", artifact.architecture.name,
                     options.opset, options.exporter)
        start = time.perf_counter()
        fp32 = torch_to_onnx(artifact.model, tmp / FP32_FILE, metadata=metadata, opset=options.opset,
                             simplify=simplify, exporter=options.exporter)
        diff = _onnx_parity(fp32, artifact.model, probe)
        if diff > PARITY_TOL:
            raise ExportError(f"ONNX logits differ from PyTorch by {diff:.2e} (> {PARITY_TOL}): export is wrong.")
        rows.append(_finish(ExportRow("ONNX FP32", FP32_FILE, "onnx", "fp32", FLOAT_NCHW, "any",
                                      time.perf_counter() - start, check=f"max|dlogit| {diff:.1e} vs torch"), fp32))

        if options.bake_preprocess:
            start = time.perf_counter()
            baked = torch_to_onnx(artifact.model, tmp / BAKED_FILE, metadata=metadata, opset=options.opset,
                                  bake_preprocess=True, simplify=simplify, exporter=options.exporter)
            rows.append(_finish(ExportRow("ONNX FP32 uint8-in", BAKED_FILE, "onnx", "fp32", UINT8_NHWC, "any",
                                          time.perf_counter() - start, check="normalisation in graph"), baked))

        if options.int8:
            rows.extend(_export_int8(fp32, tmp, calib_paths, holdout, str(calib_dir), artifact.spec, options))

        if options.trt:
            cache = options.timing_cache or out.parent / "trt_timing.cache"
            builds = ([("int8", tmp / INT8_FILE, False)] if options.int8 else []) + \
                     ([("fp16", fp32, True)] if options.fp16 else []) + \
                     ([("fp32", fp32, False)] if not (options.int8 or options.fp16) else [])
            for precision, source, fp16 in builds:
                name = f"model.{precision}.engine"
                _logger.info("TensorRT %s: building %s (batch %s)", precision.upper(), name, options.batch)
                engine = onnx_to_engine(source, tmp / name, fp16=fp16, profile=options.batch,
                                        workspace_bytes=int(options.workspace_gb * (1 << 30)),
                                        timing_cache=cache)
                rows.append(_finish(ExportRow(f"TensorRT {precision.upper()}", name, "engine", precision,
                                              FLOAT_NCHW, "tensorrt", engine.seconds,
                                              check=f"{engine.sidecar['gpu']}, batch {options.batch}"),
                                    engine.path))

        from tl_deploy.artifact import package_versions

        atomic_write_json(tmp / MANIFEST, {
            "format": MANIFEST_FORMAT,
            "format_version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tl_deploy_version": __version__,
            "source": {"path": str(model_dir), "checksum": artifact.checksum,
                       "architecture": artifact.architecture.name},
            "metadata": metadata.to_dict(),
            "options": {"opset": options.opset, "exporter": options.exporter, "simplify": simplify,
                        "calib_method": options.calib_method, "calib_images": len(calib_paths),
                        "batch": str(options.batch)},
            "versions": package_versions(),
            "files": [row.to_dict() for row in rows],
        })
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
