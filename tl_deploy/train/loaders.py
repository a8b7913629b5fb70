"""Training and evaluation loaders: reproducible shuffling, class balance, cached activations, sharding."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from tl_deploy.data import ImageDataset, Sample
from tl_deploy.train import distributed
from tl_deploy.train.distributed import SINGLE, DistContext


class ActivationDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Cached frozen-prefix outputs and their labels, in the order of the samples they came from."""

    def __init__(self, activations: torch.Tensor, samples: Sequence[Sample]) -> None:
        self.activations = activations
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.activations[index].float(), self.targets[index]


def make_loader(samples: Sequence[Sample], transform: Any, *, batch_size: int, seed: int, train: bool,
                epoch: int = 0, workers: int = 0, sample_weights: torch.Tensor | None = None,
                activations: torch.Tensor | None = None, accum_steps: int = 1,
                dist: DistContext = SINGLE) -> torch.utils.data.DataLoader:
    """A loader whose shuffling depends only on (seed, epoch): resuming replays the same order.

    Args:
        samples: (path, label) pairs.
        transform: the image transform (unused with ``activations``).
        batch_size: images per batch; when training, the global batch of one optimizer step.
        seed, epoch: the shuffling's seed.
        train: shuffle, drop an incomplete last batch, and yield this process's micro-batches of a
            global order that is the same for any process count.
        workers: DataLoader workers (0 with ``activations``).
        sample_weights: per-class weights of a balanced sampler (None: plain shuffling).
        activations: serve these cached prefix outputs instead of decoding the images.
        accum_steps: micro-batches per optimizer step on each process.
        dist: the process group.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    dataset: ImageDataset | ActivationDataset
    if activations is not None:
        dataset, workers = ActivationDataset(activations, samples), 0
    else:
        dataset = ImageDataset(samples, transform)
    sampler: torch.utils.data.Sampler[int] | None = None
    drop_last = train and len(samples) > batch_size
    if train and sample_weights is not None:
        per_sample = sample_weights[torch.tensor(dataset.targets)]
        sampler = torch.utils.data.WeightedRandomSampler(per_sample.tolist(), len(samples), generator=generator)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if sampler is not None:
        sampler = distributed.ShardSampler(sampler, dist, drop_last)  # this rank's share of the shuffled order
    if train:
        batch_size = distributed.micro_batch_size(batch_size, accum_steps, len(samples), dist)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
        generator=generator, num_workers=workers, drop_last=drop_last,
        persistent_workers=False,
    )


def inverse_frequency(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """(C,) class weights inversely proportional to each class's share of ``samples``."""
    counts = torch.bincount(torch.tensor([label for _, label in samples]), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))  # (C,)


def default_workers(device: torch.device) -> int:
    """DataLoader workers when the user chose none: 0 on a small CPU, else min(8, cores)."""
    cores = os.cpu_count() or 1
    # On a small CPU the decode of small images is cheaper than a worker's share of the cores.
    if device.type == "cpu" and cores <= 4:
        return 0
    return min(8, cores)
