"""The frozen-stage cache: one-off inference passes over frozen layers, and their outputs kept for every epoch.

When fine-tuning keeps the first backbone stages frozen and augmentation is off, their output for each
image is the same every epoch: ``StageCache`` computes it once (``fill``), keeps it in memory, and the
epochs run only the layers after the cut. The linear probe's features are such a pass too
(``StageCache.features``).

A frozen module's outputs depend only on its fixed weights, so nothing needs PyTorch's autograd there.
On a CPU, onnxruntime runs these MobileNet/EfficientNet-style layers several times faster than eager
PyTorch, most of all the depthwise convolutions at high resolution (``bench/bench_frozen.py`` prints the
ratio). The module is exported once to an in-memory ONNX graph (the TorchScript exporter folds
BatchNorm into the convolutions) and run by an onnxruntime session. Training never goes through it:
gradients flow only through the PyTorch layers that train.

The cache runtime (``--cache-runtime``): ``auto`` uses onnxruntime on a CPU device for passes over at
least ``AUTO_MIN_IMAGES`` images (an export costs 1-2 s, more than it saves on fewer) when it can export
the module, and PyTorch otherwise (on CUDA, PyTorch is already fast); ``torch`` always runs PyTorch,
bit-for-bit the eager model; ``onnxruntime`` insists and fails with a clear error when it cannot.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from tl_deploy.backbones import StageSuffix, backbone_stages, cut_after_stages, pooled_features
from tl_deploy.data import Sample
from tl_deploy.errors import TlDeployError
from tl_deploy.export.onnx import DEFAULT_OPSET, export_graph
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.runtime.base import Runner
from tl_deploy.runtime.onnxruntime_backend import OnnxRuntimeRunner
from tl_deploy.train.distributed import SINGLE, DistContext
from tl_deploy.train.feature_cache import compute_activations, compute_features

_logger = logging.getLogger(__name__)

CACHE_RUNTIMES = ("auto", "torch", "onnxruntime")
ACTIVATION_CACHE_MAX_BYTES = 4 << 30  # frozen-prefix outputs kept in memory, at most
AUTO_MIN_IMAGES = 1000  # efficientnet_lite0, 112 px: the frozen-stage export (~2 s) pays off from ~400 images

Forward = Callable[[torch.Tensor], torch.Tensor]


def resolve_cache_runtime(runtime: str, device: torch.device, num_images: int | None = None) -> str:
    """The runtime ``runtime`` stands for on ``device`` for passes over ``num_images`` images (None:
    many): ``torch`` or ``onnxruntime``."""
    if runtime not in CACHE_RUNTIMES:
        raise TlDeployError(f"Invalid --cache-runtime {runtime!r}. Only {', '.join(CACHE_RUNTIMES)} are supported.")
    if runtime == "torch":
        return "torch"
    available = _onnxruntime_available()
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise TlDeployError(f"--cache-runtime onnxruntime runs on the CPU, but the device is {device}: "
                                "use --cache-runtime torch (or auto) on a GPU.")
        if not available:
            raise TlDeployError("--cache-runtime onnxruntime needs onnxruntime: pip install onnxruntime, "
                                "or use --cache-runtime torch.")
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

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], runtime: str,
                 runner: Runner | None = None) -> None:
        self._forward = forward
        self.runtime = runtime
        self._runner = runner  # what holds the onnxruntime session, released by close()

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()

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
    chosen = resolve_cache_runtime(runtime, device)
    if chosen == "onnxruntime":
        was_training = module.training
        try:
            forward, runner = _onnxruntime_forward(_Call(module, fn).eval(), example.cpu())
            return FrozenForward(forward, "onnxruntime", runner)
        except Exception as exc:  # the exporter raises many types
            if runtime == "onnxruntime":
                raise TlDeployError(f"--cache-runtime onnxruntime could not export the frozen layers "
                                    f"({type(exc).__name__}: {str(exc)[:200]}): use --cache-runtime torch.") from exc
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


def _onnxruntime_forward(net: nn.Module, example: torch.Tensor) -> tuple[Forward, Runner]:
    """``net`` exported to an in-memory ONNX graph, run by the runtime's onnxruntime runner (CPU)."""
    with tempfile.TemporaryDirectory(prefix="tl_deploy-frozen-") as tmp:
        path = Path(tmp) / "frozen.onnx"
        # The TorchScript exporter: ~1 s, folds BatchNorm; dynamo's is many times slower to export.
        export_graph(net, example.contiguous(), path, input_name="x", output_name="y", opset=DEFAULT_OPSET,
                     exporter="torchscript")
        graph = path.read_bytes()
    # No busy-waiting between batches: the same cores decode the next batch of images meanwhile.
    runner = OnnxRuntimeRunner(graph, providers=["CPUExecutionProvider"], threads=torch.get_num_threads(),
                               spin=False)
    runner.activate()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner.infer(x.float().contiguous().numpy()))

    return forward, runner


def activation_bytes(prefix: nn.Module, input_size: int, device: torch.device) -> int:
    """Bytes of one image's cached output of the frozen ``prefix``."""
    with torch.no_grad():
        probe = prefix.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    return probe.numel() * probe.element_size()


def cut_for_cache(model: nn.Module, train_stages: int, input_size: int, device: torch.device,
                  num_images: int) -> tuple[nn.Module, StageSuffix] | None:
    """(frozen prefix, trainable rest) of ``model`` when all but its last ``train_stages`` stages can be
    cached: the architecture can be cut there and the prefix outputs of ``num_images`` images fit in
    memory. Else None."""
    cut = cut_after_stages(model, len(backbone_stages(model)) - train_stages)
    if cut is None:
        return None
    need = activation_bytes(cut[0], input_size, device) * num_images
    if need > ACTIVATION_CACHE_MAX_BYTES:
        _logger.info("frozen-stage outputs would need %.1f GiB: running every layer each epoch", need / 2**30)
        return None
    return cut


class StageCache:
    """The one-off passes of a run over its frozen layers, on the cache runtime, and what they computed.

    With ``cut`` (frozen prefix, trainable suffix) the prefix outputs of each split are kept in
    ``activations`` once ``fill`` ran; without it, only the probe's features go through here.
    """

    def __init__(self, cut: tuple[nn.Module, StageSuffix] | None, runtime: str, device: torch.device,
                 num_images: int) -> None:
        self.cut = cut
        self.device = device
        self.runtime = resolve_cache_runtime(runtime, device, num_images)  # what auto stands for here
        self._choice = "torch" if self.runtime == "torch" else runtime  # auto falls back if an export fails
        self.used: set[str] = set()  # runtimes that really ran a pass
        self.activations: dict[str, torch.Tensor] = {}  # split name -> (N, C, h, w) prefix outputs
        self._features: FrozenForward | None = None  # built on the first feature pass (an export takes ~1 s)
        self._prefix: FrozenForward | None = None  # the frozen stages' pass of fill(), reused by outputs()
        self._opened: list[FrozenForward] = []  # every forward built, to release their sessions

    @property
    def suffix(self) -> StageSuffix | None:
        """The layers after the cut, which train on the cached activations (None without a cut)."""
        return self.cut[1] if self.cut is not None else None

    def forward(self, module: nn.Module, example: torch.Tensor,
                call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> FrozenForward:
        """``x -> call(module, x)`` without gradients, on the cache runtime."""
        forward = frozen_forward(module, example, runtime=self._choice, device=self.device, call=call)
        self.used.add(forward.runtime)
        self._opened.append(forward)
        return forward

    def close(self) -> None:
        """Release the sessions of every pass (the activations stay)."""
        for forward in self._opened:
            forward.close()
        self._opened.clear()

    def __enter__(self) -> StageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fill(self, splits: dict[str, Sequence[Sample]], spec: PreprocessSpec, *, batch_size: int,
             workers: int) -> None:
        """Compute and keep the prefix outputs of every split in ``splits`` (name -> samples)."""
        if self.cut is None:
            return
        for name, samples in splits.items():
            self.activations[name] = self.outputs(samples, spec, batch_size=batch_size, workers=workers,
                                                  desc=f"{name} activations")

    def outputs(self, samples: Sequence[Sample], spec: PreprocessSpec, *, batch_size: int, workers: int,
                desc: str) -> torch.Tensor:
        """(N, C, h, w) frozen-stage outputs of ``samples`` on the cache runtime, not kept: the final
        evaluation scores the test images through the same pass as the train and val images."""
        if self.cut is None:
            raise TlDeployError("This run has no frozen-stage cut: its images run through the whole network.")
        if self._prefix is None:
            self._prefix = self.forward(self.cut[0], torch.zeros(1, 3, spec.input_size, spec.input_size))
        return compute_activations(self.cut[0], samples, spec, device=self.device, batch_size=batch_size,
                                   workers=workers, desc=desc, forward=self._prefix)

    def features(self, model: nn.Module, name: str, samples: Sequence[Sample], spec: PreprocessSpec, *,
                 batch_size: int, workers: int, dist: DistContext = SINGLE) -> torch.Tensor:
        """(N, D) pooled features of split ``name``: from its cached activations when there are some,
        else a pass of the whole backbone over the images."""
        if self.cut is not None and name in self.activations:
            acts = self.activations[name]
            if self._features is None:
                self._features = self.forward(self.cut[1], acts[:1], call=lambda m, h: m(h, pre_logits=True))
            chunks = [self._features(acts[i:i + batch_size]).cpu() for i in range(0, len(acts), batch_size)]
            return torch.cat(chunks) if chunks else torch.empty(0)
        if self._features is None:
            image = torch.zeros(1, 3, spec.input_size, spec.input_size)  # (1, 3, H, W): an export example
            self._features = self.forward(model, image, call=pooled_features)
        return compute_features(model, samples, spec, device=self.device, batch_size=batch_size, workers=workers,
                                desc=f"{name} features", dist=dist, forward=self._features)

    @property
    def prefix_runtime(self) -> str | None:
        """The runtime of the frozen stages' pass (None before ``fill`` or ``outputs`` ran one)."""
        return self._prefix.runtime if self._prefix is not None else None

    def runtime_used(self) -> str | None:
        """The runtimes that ran a pass, comma-separated (None: no pass ran)."""
        return ",".join(sorted(self.used)) or None
