"""PyTorch -> ONNX FP32: dynamic batch, full checker pass, metadata embedded, optional simplification.

Exporter choice (measured here on efficientnet_lite0, torch 2.14): the TorchScript exporter
(``dynamo=False``) takes ~3 s, honours the requested opset (17, which TensorRT 8.6+ and every
maintained onnxruntime accept) and folds BatchNorm into Conv. The dynamo exporter takes ~14 s and
cannot down-convert this graph below opset 18. Both give logits within 2e-6 of PyTorch, so the
TorchScript exporter is the default and ``exporter="dynamo"`` (opset >= 18) the alternative; with no
opset given, each exporter gets its own default (``default_opset``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_deploy.errors import BackendUnavailableError, ExportError
from tl_deploy.fileio import atomic_path
from tl_deploy.formats.metadata import OnnxMetadata, embed_metadata
from tl_deploy.formats.names import FLOAT_NCHW, IMAGE_INPUT_NAME, INPUT_NAME, OUTPUT_NAME, UINT8_NHWC
from tl_deploy.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import onnx
    from torch import nn

_logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # the torchscript exporter's; TensorRT 8.6+ and every maintained onnxruntime accept it
EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = {"torchscript": 13, "dynamo": 18}  # dynamo cannot down-convert these graphs below 18
DEFAULT_OPSETS = {"torchscript": DEFAULT_OPSET, "dynamo": 18}
MAX_OPSET = 23


def _baked_preprocess_module(model: nn.Module, spec: PreprocessSpec) -> nn.Module:
    """Wrap ``model`` so it takes uint8 (N, H, W, 3) RGB and normalises exactly like ``preprocess.normalize``."""
    import torch
    from torch import nn

    class BakedPreprocess(nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
            self.bgr = spec.channel_order == "BGR"

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (N, 3, H, W) in [0, 1]
            if self.bgr:
                x = x.flip(1)
            x = (x - self.mean) / self.std  # same op order as the numpy preprocessing
            return self.model(x)  # type: ignore[no-any-return]

    return BakedPreprocess().eval()


def default_opset(exporter: str) -> int:
    """The opset used when none is asked for: 17 with torchscript, 18 (its lowest) with dynamo."""
    if exporter not in EXPORTERS:
        raise ExportError(f"Invalid exporter {exporter!r}. Only {', '.join(EXPORTERS)} are supported.")
    return DEFAULT_OPSETS[exporter]


def torch_to_onnx(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    metadata: OnnxMetadata,
    opset: int | None = None,
    bake_preprocess: bool = False,
    simplify: bool = True,
    exporter: str = "torchscript",
) -> Path:
    """Export an eval-mode classifier to an ONNX file with a dynamic batch axis.

    The graph takes float32 (N, 3, H, W) named ``input`` or, with ``bake_preprocess``, uint8
    (N, H, W, 3) named ``image`` at ``metadata.spec.input_size``; it outputs ``logits``. The file
    passes ``onnx.checker`` (full check) and carries ``metadata`` in its metadata_props. ``opset``:
    None means the exporter's default (``default_opset``).
    """
    import torch

    if opset is None:
        opset = default_opset(exporter)
    if exporter not in EXPORTERS:
        raise ExportError(f"Invalid exporter {exporter!r}. Only {', '.join(EXPORTERS)} are supported.")
    if exporter == "dynamo" and opset < MIN_OPSET["dynamo"]:
        raise ExportError(f"The dynamo exporter needs opset >= 18, got {opset}: pass --opset 18.")
    if not 13 <= opset <= 23:
        raise ExportError(f"Invalid opset {opset}: choose 13..23 (17 suits TensorRT 8.6+ and onnxruntime).")
    if model.training:
        raise ExportError("The model is in training mode: call model.eval() before exporting.")
    size = metadata.spec.input_size
    if bake_preprocess:
        net: nn.Module = _baked_preprocess_module(model, metadata.spec)
        example = torch.zeros(1, size, size, 3, dtype=torch.uint8)  # (N, H, W, 3)
        input_name, metadata = IMAGE_INPUT_NAME, metadata.replace(input_layout=UINT8_NHWC)
    else:
        net = model
        example = torch.zeros(1, 3, size, size)  # (N, 3, H, W)
        input_name, metadata = INPUT_NAME, metadata.replace(input_layout=FLOAT_NCHW)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        raw = tmp.with_name(tmp.name + ".raw.onnx")
        try:
            export_graph(net, example, raw, input_name=input_name, opset=opset, exporter=exporter)
            proto = _load_checked(raw)
        finally:
            raw.unlink(missing_ok=True)
        if simplify:
            proto = simplify_onnx(proto)
        embed_metadata(proto, metadata)
        _check(proto, str(out))
        _save(proto, tmp)
    _logger.info("wrote %s (opset %d, %s input)", out, opset, metadata.input_layout)
    return out


def export_graph(net: nn.Module, example: Any, path: Path, *, input_name: str, opset: int, exporter: str,
                 output_name: str = OUTPUT_NAME) -> None:
    """Trace ``net`` on ``example`` into an ONNX file at ``path``, batch dimension dynamic; no checks, no metadata."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (see module docstring).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if exporter == "torchscript":
                torch.onnx.export(
                    net, (example,), str(path), input_names=[input_name], output_names=[output_name],
                    opset_version=opset, dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    do_constant_folding=True, dynamo=False,
                )
            else:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    net, (example,), str(path), input_names=[input_name], output_names=[output_name],
                    opset_version=opset, dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                )
    except Exception as exc:  # the exporters raise many types
        raise ExportError(
            f"torch.onnx.export ({exporter}, opset {opset}) failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}"
        ) from exc


def _load_checked(path: Path) -> Any:
    import onnx

    proto = onnx.load(str(path))
    _check(proto, str(path))
    return proto


def _check(proto: Any, name: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"ONNX checker rejected {name}: {str(exc).splitlines()[0][:300]}") from exc


def _save(proto: Any, path: Path) -> None:
    import onnx

    onnx.save(proto, str(path))


def simplify_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxslim") is not None


def simplify_onnx(proto: Any) -> Any:
    """Constant folding and dead-node removal with onnxslim (keeps the dynamic batch axis)."""
    try:
        import onnxslim
    except ImportError as exc:
        raise BackendUnavailableError(
            "Graph simplification needs onnxslim: pip install 'tl_deploy[simplify]', or pass --no-simplify."
        ) from exc
    try:
        return onnxslim.slim(proto)
    except Exception as exc:  # onnxslim raises many types
        raise ExportError(
            f"onnxslim failed: {type(exc).__name__}: {str(exc)[:200]}. Retry with --no-simplify."
        ) from exc


def load_float32_source(onnx_path: str | os.PathLike[str], action: str) -> tuple[onnx.ModelProto, OnnxMetadata]:
    """The float32 NCHW tl_deploy ONNX file a converter starts from, and its metadata.

    ``action`` completes the refusal of any other graph, e.g. ``"quantize"`` -> "...: quantize the
    float32 model.onnx (without --bake-preprocess)."
    """
    import onnx

    source = Path(onnx_path)
    if not source.is_file():
        raise ExportError(f"ONNX file not found: {source}. Export the FP32 model first.")
    model = onnx.load(str(source))
    metadata = OnnxMetadata.from_props({p.key: p.value for p in model.metadata_props}, origin=str(source))
    if metadata.input_layout != FLOAT_NCHW or metadata.precision != "fp32":
        raise ExportError(f"{source} is a {metadata.precision} {metadata.input_layout} graph: {action} the float32 "
                          "model.onnx (without --bake-preprocess).")
    return model, metadata
