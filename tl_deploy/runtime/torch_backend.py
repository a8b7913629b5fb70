"""The reference backend: the artifact's own PyTorch module, in eval mode under ``inference_mode``."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.errors import BackendUnavailableError
from tl_deploy.export.metadata import OnnxMetadata
from tl_deploy.runtime.base import Classifier, Runner

_logger = logging.getLogger(__name__)


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

    def __init__(self, model: object, device: str = "cpu") -> None:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"Device {device!r} asked for but torch sees no CUDA GPU: use device='cpu'."
            )
        self._torch = torch
        self.model = model.to(device).eval()  # type: ignore[attr-defined]
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tl_deploy-torch")

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)  # (N, 3, H, W)
            return self.model(x).float().cpu().numpy()  # type: ignore[no-any-return]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._executor.submit(self._forward, batch).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class TorchCudaGraphRunner(Runner):
    """PyTorch replayed from CUDA graphs: one graph captured per input shape, on static buffers.

    A graph replay launches the whole network at once, removing the per-kernel launch cost that
    dominates small batches on a GPU. Replays share their static buffers, so calls take a lock.
    """

    backend_name = "torch-cudagraph"
    precision = "fp32"
    thread_safe = True  # through the lock

    def __init__(self, model: object, device: str = "cuda") -> None:
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
        self.model = model.to(self._gpu).eval()  # type: ignore[attr-defined]
        self.device = str(self._gpu)
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def _capture(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        torch = self._torch
        static_in = torch.zeros(shape, dtype=torch.float32, device=self._gpu)  # (N, 3, H, W)
        side = torch.cuda.Stream(device=self._gpu)
        side.wait_stream(torch.cuda.current_stream(self._gpu))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # cuDNN picks its kernels before capture, on a side stream
                self.model(static_in)
        torch.cuda.current_stream(self._gpu).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, stream=side):
            static_out = self.model(static_in)  # (N, C)
        return graph, static_in, static_out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.cuda.device(self._gpu):
            shape = tuple(int(d) for d in batch.shape)
            if shape not in self._graphs:
                self._graphs[shape] = self._capture(shape)
            graph, static_in, static_out = self._graphs[shape]
            static_in.copy_(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
            graph.replay()
            return static_out.float().cpu().numpy()  # type: ignore[no-any-return]


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
    runner: Runner = TorchCudaGraphRunner(artifact.model, device=device) if cuda_graphs else \
        TorchRunner(artifact.model, device=device)
    return Classifier(runner, OnnxMetadata.from_artifact(artifact), path)
