"""The reference backend: the artifact's own PyTorch module, in eval mode under ``inference_mode``.

It computes in true FP32: on CUDA, TF32 (10-bit mantissa convolutions and matmuls) is switched off
for every call, so the reference that parity compares exports with is the same on a GPU as on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.errors import BackendUnavailableError
from tl_deploy.runtime.base import InputSpec, Runner
from tl_deploy.runtime.classifier import Classifier

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def strict_fp32(torch: Any) -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _float_input(shape: tuple[int, ...] | None) -> InputSpec:
    """A float32 (N, C, H, W) input, with the fixed (C, H, W) when known."""
    dims: tuple[int | None, ...] = tuple(shape) if shape is not None else (None, None, None)
    return InputSpec("input", np.dtype(np.float32), (None, *dims))


class TorchRunner(Runner):
    """Eager PyTorch, run on one inference thread the runner owns; thread-safe (callers queue).

    Every forward pass runs on the same thread, so all of its tensors come from one malloc arena:
    glibc gives each calling thread its own arena, and when several threads ran the model, each
    arena grew to its own peak and held it (resident memory rose for minutes under a sustained
    mixed load, bench/soak.py). Callers still preprocess in parallel; on a CPU one forward pass
    already uses every core through PyTorch's intra-op threads.
    """

    backend_name = "torch"
    precision = "fp32"
    thread_safe = True

    def __init__(self, model: object, device: str = "cpu", *, input_shape: tuple[int, ...] | None = None) -> None:
        """``input_shape``: the (C, H, W) every batch must have (None: any float32 (N, C, H, W))."""
        self.model = model
        self.device = device
        self._spec = _float_input(input_shape)
        self._executor: ThreadPoolExecutor | None = None

    def _activate_impl(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"Device {self.device!r} asked for but torch sees no CUDA GPU: use device='cpu'."
            )
        self._torch = torch
        self.model = self.model.to(self.device).eval()  # type: ignore[attr-defined]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tl_deploy-torch")

    def input_spec(self) -> InputSpec | None:
        return self._spec

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        exact = strict_fp32(torch) if self.device.startswith("cuda") else contextlib.nullcontext()
        with torch.inference_mode(), exact:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)  # (N, 3, H, W)
            return self.model(x).float().cpu().numpy()  # type: ignore[operator, no-any-return]

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        assert self._executor is not None  # set by activate, which infer() checked
        return self._executor.submit(self._forward, batch).result()

    def _deactivate_impl(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class TorchCudaGraphRunner(Runner):
    """PyTorch replayed from CUDA graphs: one graph captured per input shape, on static buffers.

    A graph replay launches the whole network at once, removing the per-kernel launch cost that
    dominates small batches on a GPU. Replays share their static buffers, so calls take a lock.
    """

    backend_name = "torch-cudagraph"
    precision = "fp32"
    thread_safe = True  # through the lock

    def __init__(self, model: object, device: str = "cuda", *, input_shape: tuple[int, ...] | None = None) -> None:
        import torch

        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"CUDA graphs need a CUDA GPU (device {device!r}, torch.cuda.is_available() "
                f"{torch.cuda.is_available()}): use the torch backend."
            )
        self._torch = torch
        # The GPU is fixed now ("cuda" is the current one): capture and replay run on it whatever device
        # is current in the calling thread, so a runner given cuda:1 never captures on GPU 0.
        index = torch.device(device).index
        self._gpu = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self.model = model
        self.device = str(self._gpu)
        self._spec = _float_input(input_shape)
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def _activate_impl(self) -> None:
        self.model = self.model.to(self._gpu).eval()  # type: ignore[attr-defined]

    def input_spec(self) -> InputSpec | None:
        return self._spec

    def _capture(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        torch = self._torch
        static_in = torch.zeros(shape, dtype=torch.float32, device=self._gpu)  # (N, 3, H, W)
        side = torch.cuda.Stream(device=self._gpu)
        side.wait_stream(torch.cuda.current_stream(self._gpu))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # cuDNN picks its kernels before capture, on a side stream
                self.model(static_in)  # type: ignore[operator]
        torch.cuda.current_stream(self._gpu).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, stream=side):
            static_out = self.model(static_in)  # type: ignore[operator]  # (N, C)
        return graph, static_in, static_out

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.cuda.device(self._gpu), strict_fp32(torch):
            shape = tuple(int(d) for d in batch.shape)
            if shape not in self._graphs:
                self._graphs[shape] = self._capture(shape)
            graph, static_in, static_out = self._graphs[shape]
            static_in.copy_(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
            graph.replay()
            return static_out.float().cpu().numpy()  # type: ignore[no-any-return]

    def _deactivate_impl(self) -> None:
        with self._lock:
            self._graphs.clear()  # the captured graphs and their static buffers


def load_torch(path: Path, *, device: str | None = None, verify: bool = True,
               cuda_graphs: bool = False) -> Classifier:
    """A model artifact folder -> classifier on the torch backend (CUDA when available).

    ``cuda_graphs``: replay CUDA graphs instead of eager calls (CUDA only).
    """
    import torch

    from tl_deploy.artifact import load_artifact

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    artifact = load_artifact(path, verify=verify)
    size = artifact.spec.input_size
    runner: Runner = TorchCudaGraphRunner(artifact.model, device=device, input_shape=(3, size, size)) \
        if cuda_graphs else TorchRunner(artifact.model, device=device, input_shape=(3, size, size))
    return Classifier(runner, artifact.onnx_metadata(), path)
