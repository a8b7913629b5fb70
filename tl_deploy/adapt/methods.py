"""The source-free adaptation methods: each adapts a model in place to preprocessed target images.

- ``adabn``: BatchNorm running statistics re-estimated on the target; no gradient step.
- ``tent``: AdaBN, then entropy minimisation of the BatchNorm affine parameters.
- ``shot``: SHOT-IM on the feature extractor with the classifier frozen (and optionally SHOT's centroid
  pseudo-labels); BatchNorm statistics stay the source model's.

A collapse tripwire checks each epoch's training-batch predictions against the source model's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tl_deploy.errors import TlDeployError, UsageError
from tl_deploy.train.target_stats import TargetStats, collapse_reason, target_stats

_logger = logging.getLogger(__name__)

METHODS = ("adabn", "tent", "shot")
DEFAULT_METHOD = "shot"
DEFAULT_LR = {"tent": 1e-3, "shot": 1e-3}  # tent: Adam on the BN affine params; shot: SGD on the backbone
_EPS = 1e-6  # inside log(p): a softmax output can underflow to 0


@dataclass(frozen=True)
class AdaptConfig:
    """The settings of one adaptation run (recorded in the new artifact's lineage)."""

    method: str = DEFAULT_METHOD
    epochs: int = 1  # passes over the target images (tent, shot)
    lr: float | None = None  # None: the method's default (DEFAULT_LR)
    batch_size: int = 64  # target images per gradient step; BN statistics (adabn) use 128 per pass
    limit: int | None = 1000  # at most this many target images, evenly spaced (None: all); 2000 measured no better
    pseudo_label_weight: float = 0.0  # shot: weight of the centroid pseudo-label cross-entropy (SHOT's beta)
    weight_decay: float = 1e-3  # shot: SGD weight decay (SHOT's value)
    seed: int = 0  # batch order and dropout

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method, 0.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lr"] = self.resolved_lr
        if self.method == "adabn":
            for key in ("epochs", "lr", "batch_size", "pseudo_label_weight", "weight_decay", "seed"):
                out.pop(key)
        elif self.method == "tent":
            for key in ("pseudo_label_weight", "weight_decay"):
                out.pop(key)
        return out


def batches(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled batch indices over ``images``; an incomplete last batch is dropped (its statistics are
    those of fewer images), unless it is the only one."""
    order = torch.randperm(len(images), generator=generator)
    size = min(batch_size, len(images))
    for start in range(0, len(images) - size + 1, size):
        yield order[start:start + size]



def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def entropy(p: torch.Tensor) -> torch.Tensor:
    """(B, C) probabilities -> (B,) entropies in nats."""
    return -(p * torch.log(p + _EPS)).sum(1)


def information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """SHOT's IM loss: mean per-image entropy minus the entropy of the batch's mean prediction."""
    p = logits.float().softmax(1)  # (B, C)
    mean = p.mean(0)  # (C,)
    return entropy(p).mean() + (mean * torch.log(mean + _EPS)).sum()


@torch.no_grad()
def adabn(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 128) -> None:
    """Replace every BatchNorm's running statistics by those of ``images`` (cumulative average)."""
    norms = batch_norms(model)
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # None: the running statistics are the plain average over all batches
    model.train()
    for start in tqdm(range(0, len(images), batch_size), desc="adabn", leave=False, disable=None):
        model(images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last))
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def _train_mode_frozen_bn(model: nn.Module) -> None:
    """Training mode (dropout on), every BatchNorm normalising with its running statistics."""
    model.train()
    for bn in batch_norms(model):
        bn.eval()


def adaptation_collapse(stats: TargetStats, before: TargetStats) -> str | None:
    """Why adaptation collapsed the target predictions (``collapse_reason`` against the source model's),
    or None. A source model already as degenerate on the target is not made worse by adapting it."""
    if stats.effective_classes >= before.effective_classes:
        return None
    return collapse_reason(stats, before)


def label_free_doubt(after: TargetStats, before: TargetStats) -> str | None:
    """A warning, not a refusal: successful adaptation makes target predictions more confident without
    concentrating them on fewer classes. Measured here, AdaBN and Tent on a model fine-tuned with ImageNet
    BatchNorm statistics raised the entropy or lost effective classes while losing 25 accuracy points."""
    problems = []
    if after.mean_entropy > before.mean_entropy:
        problems.append(f"target entropy rose from {before.mean_entropy:.3f} to {after.mean_entropy:.3f}")
    if after.effective_classes < before.effective_classes:
        problems.append(f"effective classes fell from {before.effective_classes:.1f} to {after.effective_classes:.1f}")
    return "; ".join(problems) or None


def _check_collapse(epoch_logits: list[torch.Tensor], before: TargetStats, epoch: int) -> str | None:
    """The collapse verdict on one epoch's training-batch predictions (a cheap tripwire: no extra pass)."""
    reason = adaptation_collapse(target_stats(torch.cat(epoch_logits)), before)
    if reason is not None:
        _logger.warning("epoch %d: %s; stopping the adaptation", epoch + 1, reason)
    return reason


def tent(model: nn.Module, images: torch.Tensor, cfg: AdaptConfig, device: torch.device,
         before: TargetStats) -> None:
    """AdaBN, then entropy minimisation on the BatchNorm affine parameters (Adam, ``cfg.resolved_lr``)."""
    adabn(model, images, device)
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for bn in batch_norms(model):
        for p in (bn.weight, bn.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    optimizer = torch.optim.Adam(params, lr=cfg.resolved_lr)
    _fit(model, images, cfg, device, optimizer, lambda logits, idx: entropy(logits.float().softmax(1)).mean(),
         before, lambda: None)


@torch.no_grad()
def centroid_pseudo_labels(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """SHOT's self-supervised pseudo-labels: (N,) nearest target class centroid by cosine distance, the
    centroids weighted by the predictions, then recomputed once from the hard labels."""
    from tl_deploy.backbones import pooled_features

    model.eval()
    feats = torch.cat([pooled_features(model, images[i:i + 256].to(device).contiguous(
        memory_format=torch.channels_last)).float().cpu() for i in range(0, len(images), 256)])  # (N, D)
    probs = model.get_classifier()(feats.to(device)).float().softmax(1).cpu()  # type: ignore[operator]  # (N, C)
    feats = torch.cat([feats, torch.ones(len(feats), 1)], 1)  # SHOT appends a constant 1
    feats = feats / feats.norm(dim=1, keepdim=True)
    weights = probs
    for _ in range(2):  # soft centroids, then hard ones
        centroids = weights.t() @ feats / (weights.sum(0)[:, None] + 1e-8)  # (C, D+1)
        centroids = centroids / (centroids.norm(dim=1, keepdim=True) + 1e-8)
        labels = (feats @ centroids.t()).argmax(1)  # (N,)
        weights = nn.functional.one_hot(labels, probs.shape[1]).float()
    return labels


def shot(model: nn.Module, images: torch.Tensor, cfg: AdaptConfig, device: torch.device,
         before: TargetStats) -> None:
    """SHOT-IM with the classifier frozen (SGD, Nesterov momentum 0.9, SHOT's weight decay); with
    ``cfg.pseudo_label_weight`` > 0 also SHOT's centroid pseudo-labels, recomputed every epoch."""
    head = model.get_classifier()  # type: ignore[operator]
    model.requires_grad_(True)
    head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.resolved_lr, momentum=0.9, nesterov=True,
                                weight_decay=cfg.weight_decay)
    labels: list[torch.Tensor] = []

    def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = information_maximisation(logits)
        if labels:
            loss = loss + cfg.pseudo_label_weight * nn.functional.cross_entropy(logits.float(),
                                                                                labels[0][idx].to(device))
        return loss

    def new_epoch() -> None:
        if cfg.pseudo_label_weight > 0:
            labels[:] = [centroid_pseudo_labels(model, images, device)]

    _fit(model, images, cfg, device, optimizer, loss_fn, before, new_epoch)


# (B, C) logits of a batch and the (B,) indices of its images -> the scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fit(model: nn.Module, images: torch.Tensor, cfg: AdaptConfig, device: torch.device,
         optimizer: torch.optim.Optimizer, loss_fn: LossFn, before: TargetStats,
         new_epoch: Callable[[], None]) -> None:
    """The epoch loop shared by tent and shot: BatchNorm statistics fixed, one step per batch, and the
    collapse tripwire after every epoch."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout
    for epoch in range(cfg.epochs):
        new_epoch()
        _train_mode_frozen_bn(model)
        seen: list[torch.Tensor] = []
        steps = list(batches(images, cfg.batch_size, generator))
        bar = tqdm(steps, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for idx in bar:
            x = images[idx].to(device).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
            logits = model(x)  # (B, C)
            loss = loss_fn(logits, idx)
            if not torch.isfinite(loss):
                raise TlDeployError(f"Adaptation diverged (loss {loss.item()}): lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen.append(logits.detach().float().cpu())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if _check_collapse(seen, before, epoch) is not None:
            break
    model.requires_grad_(False)
    model.eval()


def run_method(model: nn.Module, images: torch.Tensor, cfg: AdaptConfig, device: torch.device,
               before: TargetStats) -> None:
    """Adapt ``model`` in place to the preprocessed target ``images``."""
    if cfg.method == "adabn":
        adabn(model, images, device)
    elif cfg.method == "tent":
        tent(model, images, cfg, device, before)
    elif cfg.method == "shot":
        shot(model, images, cfg, device, before)
    else:
        raise UsageError(f"Invalid --method {cfg.method!r}. Only {', '.join(METHODS)} are supported.")
