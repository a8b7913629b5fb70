"""Unsupervised guard rails for domain adaptation: what a model's predictions on unlabelled target images say.

With no target labels, a user still needs to know whether adaptation helped or broke the model. From
the (N, C) logits a model gives the target images, and optionally those of a reference model (the
source-only model, or the artifact before adaptation) on the same images:

- ``mean_entropy``: the mean per-image prediction entropy, in nats, divided by ``log C`` (0: every
  prediction certain, 1: every prediction uniform). Successful adaptation usually lowers it.
- ``class_fractions``: the share of target images predicted as each class.
- ``effective_classes``: ``exp(H)`` of that predicted-class distribution (C for a balanced prediction, 1
  when every image gets the same class): the collapse signal.
- ``drift``: total-variation distance between the predicted-class distribution and the reference's
  (0: same, 1: disjoint).
- ``agreement``: the share of images whose top-1 class is the reference's.

``collapse_reason`` turns these into a verdict: a model whose target predictions cover fewer than half
the classes the reference covers (by ``effective_classes``) has collapsed, as DANN does when its
discriminator wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

COLLAPSE_FRACTION = 0.5  # collapsed: effective classes below this share of the reference's


@dataclass(frozen=True)
class TargetStats:
    """Label-free statistics of a model's predictions on target images (see the module docstring)."""

    images: int
    mean_entropy: float
    effective_classes: float
    class_fractions: list[float]
    drift: float | None = None
    agreement: float | None = None

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        out = asdict(self)
        out["mean_entropy"] = round(self.mean_entropy, 4)
        out["effective_classes"] = round(self.effective_classes, 3)
        fractions = [round(f, 4) for f in self.class_fractions]
        out["class_fractions"] = dict(zip(class_names, fractions, strict=True)) if class_names else fractions
        for key in ("drift", "agreement"):
            if out[key] is not None:
                out[key] = round(out[key], 4)
        return out

    def summary(self) -> str:
        """One line for the log."""
        text = f"target entropy {self.mean_entropy:.3f}, {self.effective_classes:.1f} effective classes"
        if self.drift is not None:
            text += f", class drift {self.drift:.3f}"
        if self.agreement is not None:
            text += f", agreement with the reference {100 * self.agreement:.1f}%"
        return text


def _distribution_entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def target_stats(logits: torch.Tensor, reference: torch.Tensor | None = None) -> TargetStats:
    """Statistics of (N, C) target ``logits``; ``reference``: (N, C) logits of another model on the same images."""
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"target_stats needs (N, C) logits with N >= 1, got {tuple(logits.shape)}")
    logits = logits.float()
    n, c = logits.shape
    log_p = torch.log_softmax(logits, dim=1)  # (N, C)
    entropy = -(log_p.exp() * log_p).sum(1).mean() / math.log(c) if c > 1 else torch.tensor(0.0)
    top1 = logits.argmax(1)  # (N,)
    fractions = torch.bincount(top1, minlength=c).double() / n  # (C,)
    drift = agreement = None
    if reference is not None:
        if reference.shape != logits.shape:
            raise ValueError(f"reference logits {tuple(reference.shape)} do not match {tuple(logits.shape)}")
        ref_top1 = reference.argmax(1)
        ref_fractions = torch.bincount(ref_top1, minlength=c).double() / n
        drift = float(0.5 * (fractions - ref_fractions).abs().sum())
        agreement = float((top1 == ref_top1).double().mean())
    return TargetStats(images=n, mean_entropy=float(entropy),
                       effective_classes=math.exp(_distribution_entropy(fractions)),
                       class_fractions=[float(f) for f in fractions], drift=drift, agreement=agreement)


def collapse_reason(stats: TargetStats, reference: TargetStats | None = None,
                    num_classes: int | None = None) -> str | None:
    """Why ``stats`` looks collapsed, or None. The bar is half the reference's effective classes (or half
    of ``num_classes`` with no reference), and never below 1.5."""
    base = reference.effective_classes if reference is not None else float(num_classes or len(stats.class_fractions))
    floor = max(1.5, COLLAPSE_FRACTION * base)
    if stats.effective_classes >= floor:
        return None
    top = max(range(len(stats.class_fractions)), key=lambda k: stats.class_fractions[k])
    against = "the reference model's" if reference is not None else "the number of classes"
    return (f"the target predictions collapsed to {stats.effective_classes:.1f} effective classes (below "
            f"{floor:.1f}, half of {against} {base:.1f}); {100 * stats.class_fractions[top]:.0f}% of the target "
            f"images get class {top}")
