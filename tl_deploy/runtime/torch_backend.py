"""The reference backend: the artifact's own PyTorch module, in eval mode under ``inference_mode``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tl_deploy.errors import BackendUnavailableError
from tl_deploy.export.metadata import OnnxMetadata
from tl_deploy.runtime.base import Classifier, Runner

_logger = logging.getLogger(__name__)


class TorchRunner(Runner):
    """Eager PyTorch. Thread-safe: eval mode, no grad, nothing mutated per call."""

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

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)  # (N, 3, H, W)
            return self.model(x).float().cpu().numpy()  # type: ignore[no-any-return]


def load_torch(path: Path, *, device: str | None = None, verify: bool = True) -> Classifier:
    """A model artifact folder -> classifier on the torch backend (CUDA when available)."""
    import torch

    from tl_deploy.artifact import load_artifact

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    artifact = load_artifact(path, verify=verify)
    runner = TorchRunner(artifact.model, device=device)
    return Classifier(runner, OnnxMetadata.from_artifact(artifact), path)
