"""Inference-only passes over frozen layers, on the fastest runtime at hand.

A frozen module's outputs (the first stages' activations, a linear probe's features) depend only on
its fixed weights, so nothing needs PyTorch's autograd there. On a CPU, onnxruntime runs these
MobileNet/EfficientNet-style layers several times faster than eager PyTorch, most of all the depthwise
convolutions at high resolution (``bench/bench_frozen.py`` prints the ratio). The module is exported
once to an in-memory ONNX graph (the TorchScript exporter folds BatchNorm into the convolutions) and
run by an onnxruntime session. Training never goes through it: gradients flow only through the
PyTorch layers that train.

``runtime``: ``auto`` uses onnxruntime on a CPU device for passes over at least ``AUTO_MIN_IMAGES``
images (an export costs 1-2 s, more than it saves on fewer) when it can export the module, and PyTorch
otherwise (on CUDA, PyTorch is already fast); ``torch`` always runs PyTorch, bit-for-bit the eager
model; ``onnxruntime`` insists and fails with a clear error when it cannot.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tl_deploy.errors import TlDeployError
from tl_deploy.export.onnx import DEFAULT_OPSET, export_graph

_logger = logging.getLogger(__name__)

FROZEN_RUNTIMES = ("auto", "torch", "onnxruntime")
AUTO_MIN_IMAGES = 1000  # efficientnet_lite0, 112 px: the frozen-stage export (~2 s) pays off from ~400 images

Forward = Callable[[torch.Tensor], torch.Tensor]


def resolve_frozen_runtime(runtime: str, device: torch.device, num_images: int | None = None) -> str:
    """The runtime ``runtime`` stands for on ``device`` for passes over ``num_images`` images (None:
    many): ``torch`` or ``onnxruntime``."""
    if runtime not in FROZEN_RUNTIMES:
        raise TlDeployError(f"Invalid --frozen-runtime {runtime!r}. Only {', '.join(FROZEN_RUNTIMES)} are supported.")
    if runtime == "torch":
        return "torch"
    available = _onnxruntime_available()
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise TlDeployError(f"--frozen-runtime onnxruntime runs on the CPU, but the device is {device}: "
                                "use --frozen-runtime torch (or auto) on a GPU.")
        if not available:
            raise TlDeployError("--frozen-runtime onnxruntime needs onnxruntime: pip install onnxruntime, "
                                "or use --frozen-runtime torch.")
        return "onnxruntime"
    many = num_images is None or num_images >= AUTO_MIN_IMAGES
    return "onnxruntime" if device.type == "cpu" and available and many else "torch"


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class FrozenForward:
    """``x -> outputs`` of frozen layers; ``runtime`` says which runtime computes them."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], runtime: str) -> None:
        self._forward = forward
        self.runtime = runtime

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


class _Call(nn.Module):
    """``fn(module, x)`` as a module, so a call with keyword arguments (``pre_logits=True``) can be traced."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.module, x)


def frozen_forward(module: nn.Module, example: torch.Tensor, *, runtime: str, device: torch.device,
                   call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> FrozenForward:
    """A function ``x -> call(module, x)`` in eval mode, without gradients, on ``runtime``.

    ``example`` is one input (any batch size) for the export; ``call`` defaults to ``module(x)``.
    The returned function takes a batch on ``device`` and returns a float32 tensor on ``device``.
    """
    fn = call or (lambda m, x: m(x))
    chosen = resolve_frozen_runtime(runtime, device)
    if chosen == "onnxruntime":
        was_training = module.training
        try:
            return FrozenForward(_onnxruntime_forward(_Call(module, fn).eval(), example.cpu()), "onnxruntime")
        except Exception as exc:  # the exporter raises many types
            if runtime == "onnxruntime":
                raise TlDeployError(f"--frozen-runtime onnxruntime could not export the frozen layers "
                                    f"({type(exc).__name__}: {str(exc)[:200]}): use --frozen-runtime torch.") from exc
            _logger.warning("frozen layers run in PyTorch: ONNX export failed (%s: %s)", type(exc).__name__,
                            str(exc)[:200])
        finally:
            module.train(was_training)

    @torch.no_grad()
    def torch_forward(x: torch.Tensor) -> torch.Tensor:
        was_training = module.training
        module.eval()
        try:
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W): faster convolutions
            return fn(module, x).float()
        finally:
            module.train(was_training)

    return FrozenForward(torch_forward, "torch")


def _onnxruntime_forward(net: nn.Module, example: torch.Tensor) -> Forward:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="tl_deploy-frozen-") as tmp:
        path = Path(tmp) / "frozen.onnx"
        # The TorchScript exporter: ~1 s, folds BatchNorm; dynamo's is many times slower to export.
        export_graph(net, example.contiguous(), path, input_name="x", output_name="y", opset=DEFAULT_OPSET,
                     exporter="torchscript")
        graph = path.read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # No busy-waiting between batches: the same cores decode the next batch of images meanwhile.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = session.run(None, {"x": x.float().contiguous().numpy()})[0]
        return torch.from_numpy(y)

    return forward
