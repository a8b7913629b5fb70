"""Per-epoch training checkpoints, written atomically with a checksum, for ``--resume``.

The checkpoint of ``models/<run>`` lives in ``models/.<run>.checkpoint/`` and is removed once the
artifact is complete. It is read with ``torch.load(weights_only=True)``: tensors and plain Python
values only, nothing is executed.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_deploy.errors import TlDeployError
from tl_deploy.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes

_logger = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores the training state of one run."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], writer: bool = True) -> None:
        self.dir = out.parent / f".{out.name}.checkpoint"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.writer = writer  # False on every distributed rank but 0: one process writes

    @property
    def state_file(self) -> Path:
        return self.dir / "state.pt"

    @property
    def meta_file(self) -> Path:
        return self.dir / "meta.json"

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, run_state: Any,
             best: dict[str, torch.Tensor] | None = None) -> None:
        if not self.writer:
            return
        payload = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "run_state": asdict(run_state),
            "best": best,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        # State first, then the meta that vouches for it: a crash between the two leaves a meta
        # whose checksum does not match, and that checkpoint is ignored rather than trusted.
        atomic_write_bytes(self.state_file, data)
        atomic_write_json(self.meta_file, {"sha256": sha256_bytes(data), "fingerprint": self.fingerprint})

    def load(self) -> dict[str, Any] | None:
        if not self.meta_file.is_file() or not self.state_file.is_file():
            return None
        try:
            meta = json.loads(self.meta_file.read_text())
        except ValueError:
            _logger.warning("ignoring unreadable checkpoint metadata %s", self.meta_file)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            raise TlDeployError(
                f"The checkpoint in {self.dir} belongs to a run with other settings or data. "
                "Resume with the same options, or drop --resume to start over."
            )
        data = self.state_file.read_bytes()
        if sha256_bytes(data) != meta.get("sha256"):
            _logger.warning("checkpoint %s is incomplete (checksum mismatch); starting over", self.state_file)
            return None
        loaded: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return loaded

    def clear(self) -> None:
        if self.writer:
            shutil.rmtree(self.dir, ignore_errors=True)
