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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tl_deploy.artifact import non_finite_weights
from tl_deploy.errors import ArtifactError, TlDeployError
from tl_deploy.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes

if TYPE_CHECKING:
    from tl_deploy.data import Splits
    from tl_deploy.train.config import TrainConfig

_logger = logging.getLogger(__name__)

# Options that do not change the math: a run may resume with other ones (other hardware, other
# process counts, other --grad-accum-steps).
NOT_FINGERPRINTED = ("resume", "workers", "device", "threads", "cache_dir", "no_cache", "grad_accum_steps")


@dataclass
class RunState:
    """What a checkpoint restores: progress, history and the best weights so far."""

    phase: str = "probe"
    epoch: int = 0  # completed epochs of the current phase
    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0


def fingerprint(cfg: TrainConfig, splits: Splits) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    return {"config": keep, "classes": splits.class_names, "train": len(splits.train), "val": len(splits.val)}


def checkpoint_mismatch(exc: BaseException, what: str, where: Path | None = None) -> ArtifactError:
    """One line for a checkpoint whose contents do not fit the model being resumed."""
    first = " ".join(str(exc).split())[:300] or type(exc).__name__
    todo = f"Delete {where} and drop" if where is not None else "Drop"
    return ArtifactError(f"The checkpoint's {what} does not fit this run ({first}). {todo} --resume to start over.")


def restore_checkpoint(model: nn.Module, loaded: dict[str, Any], where: Path) -> RunState:
    """Weights and progress from a checkpoint; one clear error when they do not fit ``model``."""
    try:
        model.load_state_dict(loaded["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # unexpected/missing keys, shapes
        raise checkpoint_mismatch(exc, "model state", where) from exc
    try:
        return RunState(**loaded["run_state"])
    except (KeyError, TypeError) as exc:
        raise checkpoint_mismatch(exc, "run state", where) from exc


class Checkpointer:
    """Saves and restores the training state of one run.

    Each save writes a new state file (``state-<phase>-<epoch>.pt``) atomically, then ``meta.json``
    that names it with its sha256, and only then removes older state files. A kill at any moment
    leaves a meta that points at a complete state file: resuming continues from the last complete
    checkpoint, never from a torn one.
    """

    def __init__(self, out: Path, fingerprint: dict[str, Any], writer: bool = True) -> None:
        self.dir = out.parent / f".{out.name}.checkpoint"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.writer = writer  # False on every distributed rank but 0: one process writes

    @property
    def meta_file(self) -> Path:
        return self.dir / "meta.json"

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, run_state: Any,
             best: dict[str, torch.Tensor] | None = None) -> None:
        if not self.writer:
            return
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        bad = non_finite_weights(weights)
        if bad:  # nothing to resume from: drop older states too, so the failed run leaves nothing
            self.clear()
            raise ArtifactError(f"Training diverged: {len(bad)} weight tensor(s) hold NaN or infinity after "
                                f"{run_state.phase} epoch {run_state.epoch} ({', '.join(bad[:5])}). Lower --lr or "
                                "--weight-decay, or check the data; nothing was written.")
        payload = {
            "model": weights,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "run_state": asdict(run_state),
            "best": best,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        name = f"state-{run_state.phase}-{run_state.epoch}.pt"
        atomic_write_bytes(self.dir / name, data)
        atomic_write_json(self.meta_file, {"state": name, "sha256": sha256_bytes(data),
                                           "fingerprint": self.fingerprint})
        for old in self.dir.iterdir():  # older states and temp files of an interrupted save
            if old.name not in (name, self.meta_file.name):
                old.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        """The last complete checkpoint, or None when there is none (or it cannot be trusted)."""
        if not self.meta_file.is_file():
            return None
        try:
            meta = read_json(self.meta_file)
        except (ValueError, UnicodeDecodeError):
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), str) or "/" in meta["state"]:
            _logger.warning("ignoring unreadable checkpoint metadata %s; starting over", self.meta_file)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            raise TlDeployError(
                f"The checkpoint in {self.dir} belongs to a run with other settings or data. "
                "Resume with the same options, or drop --resume to start over."
            )
        state_file = self.dir / meta["state"]
        if not state_file.is_file():
            _logger.warning("checkpoint %s is missing; starting over", state_file)
            return None
        data = state_file.read_bytes()
        if sha256_bytes(data) != meta.get("sha256"):
            _logger.warning("checkpoint %s does not match its checksum; starting over", state_file)
            return None
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code with UnpicklingError and others
            raise ArtifactError(
                f"Refusing to load checkpoint {state_file}: not a plain tensor checkpoint "
                f"({type(exc).__name__}). Delete {self.dir} and drop --resume to start over."
            ) from exc
        if not isinstance(loaded, dict) or not {"model", "run_state"} <= set(loaded):
            raise ArtifactError(f"Checkpoint {state_file} is not a tl_deploy training checkpoint. Delete {self.dir}.")
        return loaded

    def clear(self) -> None:
        if self.writer:
            shutil.rmtree(self.dir, ignore_errors=True)
