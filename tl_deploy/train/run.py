"""``Run``: what every step of one fine-tuning run shares (settings, data, output, progress)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tl_deploy.data import Sample, Splits
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.train.amp import AmpChoice
from tl_deploy.train.checkpoint import Checkpointer, RunState
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.distributed import DistContext


@dataclass
class Run:
    """What every step of one run shares: its settings, data, output and progress."""

    cfg: TrainConfig
    dist: DistContext
    data_dir: Path
    out: Path
    splits: Splits
    train_samples: list[Sample]  # splits.train, or its few-shot subset
    class_weights: torch.Tensor  # (C,) inverse class frequencies of train_samples
    workers: int
    amp: AmpChoice
    ckpt: Checkpointer
    target_samples: list[Sample] = field(default_factory=list)  # --da: the unlabelled target images, read once
    schedule: dict[str, Any] = field(default_factory=dict)  # resolved epochs and why (TrainConfig.resolve_schedule)
    native_size: int | None = None  # the training images' median shorter side (setup.native_size)
    state: RunState = field(default_factory=RunState)
    resumed: dict[str, Any] | None = None  # the checkpoint this run resumed from
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # step name -> perf_counter at its end
    eval_path: str = "PyTorch"  # what computed the final evaluation (metrics.json)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @functools.cached_property
    def spec(self) -> PreprocessSpec:
        """The run's one preprocessing spec (the model's data config, the flags, the data's native size)."""
        return self.cfg.spec(self.native_size)

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    @property
    def eval_batch(self) -> int:
        return max(self.cfg.batch_size, 128)

    def loss_weights(self) -> torch.Tensor | None:
        """Per-class loss weights with ``--balance weights``."""
        return self.class_weights if self.cfg.balance == "weights" else None

    def sample_weights(self) -> torch.Tensor | None:
        """Per-class draw weights of a balanced sampler with ``--balance sampler``."""
        return self.class_weights if self.cfg.balance == "sampler" else None

    def resumes_finetuning(self) -> bool:
        return self.resumed is not None and self.state.phase == "finetune"
