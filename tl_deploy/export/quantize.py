"""ONNX FP32 -> INT8 ONNX: static post-training quantization with ONNX Runtime, calibrated on real images.

Two targets, both QDQ with per-channel weights (choices measured on efficientnet_lite0 / Animal-Shape,
see export/README.md):

- ``tensorrt`` (``model.int8.onnx``): int8 activations and weights, all symmetric (zero point 0),
  float biases, one Q/DQ pair per consumer: the form TensorRT takes for explicit quantization. The
  first conv (reading the image) stays float: exact integer arithmetic (TensorRT, or onnxruntime
  with QDQ fusion disabled) then loses -0.1..0.5 point instead of 0.65.
- ``cpu`` (``model.int8.cpu.onnx``): uint8 activations and int8 weights, except uint8 weights on the
  dense convolutions whose input can be negative (the stem and the 1x1 expansions fed by residual
  sums). On x86 CPUs without VNNI, onnxruntime's u8 x s8 kernels add pairs of products in int16
  (``vpmaddubsw``) and saturate when the activations sit around their zero point ~128; that cost
  17 points here. Those convs run the u8 x u8 kernel instead (no saturation); the rest keep the
  faster u8 x s8 kernel, whose unsigned ReLU6 inputs stay far from saturation.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.errors import DataError, ExportError
from tl_deploy.export.onnx import load_float32_source
from tl_deploy.fileio import atomic_path
from tl_deploy.formats.metadata import OnnxMetadata, embed_metadata
from tl_deploy.formats.names import FLOAT_NCHW, UINT8_NHWC
from tl_deploy.preprocess import IMAGE_EXTENSIONS, PreprocessSpec, prepare, prepare_uint8

_logger = logging.getLogger(__name__)

TARGETS = ("tensorrt", "cpu")
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_SAMPLES = 512
CALIB_BATCH = 32
_SIGNLESS_PRODUCERS = ("Relu", "Clip")  # outputs >= 0 in our graphs (Clip is ReLU6)


@dataclass(frozen=True)
class QuantizationConfig:
    """How a float ONNX graph becomes INT8 (recorded in the INT8 file's metadata)."""

    target: str = "tensorrt"  # "tensorrt": symmetric int8 QDQ; "cpu": tuned for onnxruntime on x86
    method: str = "minmax"  # calibration: minmax matched entropy/percentile here and is 2.5x faster
    per_channel: bool = True  # per-output-channel weight scales: folded BatchNorm spreads channel ranges
    nodes_to_exclude: tuple[str, ...] = ()  # node names kept in float
    float_first_conv: bool = False  # keep the conv reading the image in float (TensorRT file: measured better)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ExportError(f"Invalid INT8 target {self.target!r}. Only {', '.join(TARGETS)} exist.")
        if self.method not in METHODS:
            raise ExportError(
                f"Invalid calibration method {self.method!r}. Only {', '.join(METHODS)} are supported."
            )

    def to_dict(self) -> dict[str, Any]:
        sym = self.target == "tensorrt"
        return {
            "target": self.target,
            "format": "QDQ",
            "calibration_method": self.method,
            "per_channel": self.per_channel,
            "activations": "int8 symmetric" if sym else "uint8 asymmetric",
            "bias": "float" if sym else "int32",
            "weights": "int8 symmetric" if sym else "int8 symmetric; uint8 on convs with signed input",
            "nodes_kept_float": list(self.nodes_to_exclude),
            "float_first_conv": self.float_first_conv,
        }


@dataclass(frozen=True)
class QuantizationResult:
    path: Path
    config: QuantizationConfig
    calibration_images: int
    uint8_weight_nodes: tuple[str, ...] = field(default=())  # cpu target: convs given the u8 x u8 kernel
    seconds: float = 0.0


# --------------------------------------------------------------------------- calibration data


def select_calibration_images(data_dir: str | os.PathLike[str], max_images: int, seed: int = 0,
                              holdout: int = 0) -> list[Path]:
    """Up to ``max_images + holdout`` image files from ``data_dir``, balanced over its class folders.

    ``data_dir`` may be an ImageFolder root (its ``train/`` split is used), a folder of class
    folders, or a flat folder of images. The pick is seeded and interleaves classes, so a small
    ``max_images`` still covers every class. The first ``max_images`` calibrate; the ``holdout``
    after them (when there are that many) check the INT8 file.
    """
    if max_images <= 0:
        raise DataError(f"Invalid --calib-samples {max_images}: choose a positive number of images.")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"Calibration folder not found: {root}. Pass --calib-data DIR with real images.")
    if (root / "train").is_dir():
        root = root / "train"
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not any(
            part.startswith(".") for part in path.relative_to(root).parts
        ):
            groups.setdefault(str(path.parent.relative_to(root)), []).append(path)
    if not groups:
        raise DataError(
            f"No images in {root} for INT8 calibration (accepted: {', '.join(IMAGE_EXTENSIONS)})."
        )
    rng = np.random.default_rng(seed)
    shuffled = [[files[i] for i in rng.permutation(len(files))] for _, files in sorted(groups.items())]
    picked: list[Path] = []
    for rank in range(max(len(files) for files in shuffled)):
        for files in shuffled:
            if rank < len(files):
                picked.append(files[rank])
    if len(picked) < max_images:
        _logger.warning("calibrating on all %d images in %s (fewer than the %d asked)%s", len(picked), root,
                        max_images, "; none is left to hold out for the INT8 check" if holdout else "")
    elif len(picked) < max_images + holdout:
        _logger.warning("%d images in %s: %d calibrate, %d of the %d asked are held out for the INT8 check",
                        len(picked), root, max_images, len(picked) - max_images, holdout)
    return picked[:max_images + holdout]


def calibration_batches(paths: Sequence[Path], spec: PreprocessSpec, *, batch_size: int = CALIB_BATCH,
                        input_layout: str = FLOAT_NCHW) -> Iterator[np.ndarray]:
    """Preprocess images exactly like the runtime and yield them in batches.

    ``float32_nchw``: (B, 3, H, W) float32; ``uint8_nhwc``: (B, H, W, 3) uint8.
    """
    if batch_size <= 0:
        raise DataError(f"Invalid calibration batch size {batch_size}: choose a positive number.")
    convert = prepare if input_layout == FLOAT_NCHW else prepare_uint8
    if input_layout not in (FLOAT_NCHW, UINT8_NHWC):
        raise DataError(f"Invalid input layout {input_layout!r}.")
    for start in range(0, len(paths), batch_size):
        yield np.stack([convert(p, spec) for p in paths[start:start + batch_size]])


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over an iterable of batches; counts images."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name = input_name
        self._batches = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.count += int(batch.shape[0])
        return {self.input_name: batch}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.get_next()) is not None:
            yield item


# --------------------------------------------------------------------------- converter


def signed_input_convs(model: Any) -> list[Any]:
    """Dense (group 1) Conv nodes whose input is not produced by a ReLU-like op, so it can be negative."""
    producers = {out: node for node in model.graph.node for out in node.output}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        producer = producers.get(node.input[0])
        if group == 1 and (producer is None or producer.op_type not in _SIGNLESS_PRODUCERS):
            convs.append(node)
    return convs


def onnx_to_int8_onnx(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    batches: Iterable[np.ndarray],
    *,
    config: QuantizationConfig,
    calibration_source: str = "",
    calibration_cache: str | os.PathLike[str] | None = None,
) -> QuantizationResult:
    """Quantize a float32 tl_deploy ONNX file to INT8 (QDQ), calibrating on ``batches``.

    ``batches`` are (B, 3, H, W) float32 arrays preprocessed like the runtime does it (see
    ``calibration_batches``). The output keeps the input's metadata, with precision ``int8`` and
    the quantization choices added. ``calibration_cache``: a file where onnxruntime stores the
    measured tensor ranges; when it exists they are reused instead of re-running calibration (the
    ranges do not depend on the target, so both INT8 files share one calibration pass).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    start = time.perf_counter()
    source = Path(onnx_path)
    model, metadata = load_float32_source(source, "quantize")
    input_name = model.graph.input[0].name
    known = {n.name for n in model.graph.node}
    unknown = sorted(set(config.nodes_to_exclude) - known)
    if unknown:
        raise ExportError(f"Nodes to keep in float not in the graph: {unknown[:5]}.")
    exclude = list(config.nodes_to_exclude)
    if config.float_first_conv:
        exclude += [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] == input_name]

    extra: dict[str, Any] = {"CalibMovingAverage": False}
    uint8_nodes: list[str] = []
    if config.target == "tensorrt":
        activation_type = QuantType.QInt8
        # Biases stay float (TensorRT's parser rejects int32 DequantizeLinear and fuses the bias
        # itself); one Q/DQ pair per consumer, the form TensorRT's Q/DQ fusion expects.
        extra.update(ActivationSymmetric=True, WeightSymmetric=True, QuantizeBias=False, DedicatedQDQPair=True)
    else:
        activation_type = QuantType.QUInt8
        convs = [n for n in signed_input_convs(model) if n.name not in exclude]
        uint8_nodes = [n.name for n in convs]
        axis = {"axis": 0} if config.per_channel else {}
        extra["TensorQuantOverrides"] = {
            n.input[1]: [{**axis, "quant_type": QuantType.QUInt8, "symmetric": False}] for n in convs
        }
    listed = sum(int(b.shape[0]) for b in batches) if isinstance(batches, Sequence) else 0
    reader = _FeedReader(input_name, batches)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    out = Path(out_path)
    with atomic_path(out) as tmp:
        try:
            quantize_static(
                model, str(tmp), reader,  # type: ignore[arg-type]  # duck-typed CalibrationDataReader
                quant_format=QuantFormat.QDQ, activation_type=activation_type, weight_type=QuantType.QInt8,
                per_channel=config.per_channel, reduce_range=False, calibrate_method=method,
                nodes_to_exclude=exclude, extra_options=extra,
                calibration_cache_path=None if calibration_cache is None else str(calibration_cache),
            )
        except Exception as exc:  # onnxruntime raises many types
            raise ExportError(
                f"INT8 quantization of {source} failed: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        count = reader.count or listed  # 0 read when the calibration cache answered
        if count == 0:
            raise ExportError("INT8 calibration got no images: check --calib-data.")
        quantized = onnx.load(str(tmp))
        info = {**config.to_dict(), "nodes_kept_float": exclude, "calibration_images": count,
                "calibration_source": calibration_source, "uint8_weight_nodes": len(uint8_nodes)}
        embed_metadata(quantized, metadata.replace(precision="int8", quantization=info))
        try:
            onnx.checker.check_model(quantized, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"ONNX checker rejected the INT8 graph: {str(exc)[:300]}") from exc
        onnx.save(quantized, str(tmp))
    seconds = time.perf_counter() - start
    _logger.info("wrote %s (%s, %s calibration on %d images, %.1f s)", out, config.target, config.method,
                 count, seconds)
    return QuantizationResult(path=out, config=config, calibration_images=count,
                              uint8_weight_nodes=tuple(uint8_nodes), seconds=seconds)


def int8_weight_fraction(onnx_path: str | os.PathLike[str]) -> float:
    """Share of weight bytes stored as 8-bit integers (sanity check for a quantized file)."""
    import onnx

    model = onnx.load(str(onnx_path))
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    total = quantized = 0
    for init in model.graph.initializer:
        size = len(init.raw_data) if init.raw_data else 0
        total += size
        if init.data_type in eight_bit:
            quantized += size
    return quantized / total if total else 0.0
