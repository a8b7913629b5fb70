"""Unsupervised domain adaptation: labelled source images, unlabelled target images.

    python -m tl_deploy.finetune --data SOURCE_DIR --target-unlabeled TARGET_DIR --da {dann,mmd,coral}

Each method adds one alignment loss to the source classification loss, following its paper:

- ``dann`` (Ganin et al., JMLR 2016): a domain discriminator on the pooled features, trained through a
  gradient-reversal layer whose coefficient ramps as ``2 / (1 + exp(-10 p)) - 1`` with training
  progress ``p`` in [0, 1] (the paper's warm-up schedule), so the backbone learns features the
  discriminator cannot tell apart.
- ``mmd`` (Long et al., DAN, ICML 2015): multi-kernel MMD between source and target pooled features,
  a sum of 5 Gaussian kernels with bandwidths ``b * 2**k`` (k = -2..2) around the batch's mean
  squared distance ``b``; the unbiased estimator.
- ``coral`` (Sun and Saenko, Deep CORAL, ECCV-W 2016): ``||C_s - C_t||_F^2 / (4 d^2)`` between the
  covariances of the source and target outputs of the last layer (the logits, as in the paper).

Only the trained classifier is kept: the artifact is a normal one. Model selection uses held-out
*source* validation images; target labels, if the target folder has any, are read only to report
target test accuracy after training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_deploy.backbones import pooled_features
from tl_deploy.data import Sample, scan_split
from tl_deploy.errors import DataError

_logger = logging.getLogger(__name__)

DA_METHODS = ("dann", "mmd", "coral")


# ----------------------------------------------------------------------------- losses

class _GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``-coeff`` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Gradient-reversal layer (GRL)."""
    return _GradientReversal.apply(x, coeff)  # type: ignore[no-any-return]


def dann_coefficient(progress: float, gamma: float = 10.0) -> float:
    """DANN's GRL schedule: 0 at the start, ~1 at the end, so early noisy domain gradients are damped."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


class DomainDiscriminator(nn.Module):
    """(B, D) features -> (B,) logit of "this came from the source domain"."""

    def __init__(self, in_features: int, hidden: int = 256, drop_rate: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(drop_rate),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(drop_rate),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # type: ignore[no-any-return]


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)  # (N,)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp(min=0.0)  # (N, N)


def mk_mmd(source: torch.Tensor, target: torch.Tensor, num_kernels: int = 5, kernel_mul: float = 2.0) -> torch.Tensor:
    """Unbiased squared multi-kernel MMD between (N, D) source and (M, D) target samples."""
    n, m = len(source), len(target)
    if n < 2 or m < 2:
        raise DataError(f"MMD needs at least 2 source and 2 target samples per batch, got {n} and {m}.")
    total = torch.cat([source, target]).float()  # (N+M, D)
    d2 = _squared_distances(total)  # (N+M, N+M)
    bandwidth = (d2.sum() / (len(total) ** 2 - len(total))).detach().clamp(min=1e-12)
    scales = [kernel_mul ** (k - num_kernels // 2) for k in range(num_kernels)]
    kernels = torch.stack([torch.exp(-d2 / (bandwidth * s)) for s in scales]).sum(0)  # (N+M, N+M)
    k_ss, k_tt, k_st = kernels[:n, :n], kernels[n:, n:], kernels[:n, n:]
    return ((k_ss.sum() - k_ss.diagonal().sum()) / (n * (n - 1))
            + (k_tt.sum() - k_tt.diagonal().sum()) / (m * (m - 1))
            - 2.0 * k_st.mean())


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL loss between (N, D) and (M, D): squared Frobenius distance of covariances / 4 d^2."""
    if len(source) < 2 or len(target) < 2:
        raise DataError(f"CORAL needs at least 2 source and 2 target samples per batch, got {len(source)} "
                        f"and {len(target)}.")
    d = source.shape[1]
    c_s = torch.cov(source.float().T)  # (D, D)
    c_t = torch.cov(target.float().T)  # (D, D)
    return ((c_s - c_t) ** 2).sum() / (4.0 * d * d)


# ----------------------------------------------------------------------------- target data

def unlabeled_samples(root: str | Path) -> list[Sample]:
    """Target images for adaptation: ``root/train/**`` if it exists, else every image under ``root``.
    Any folder labels are dropped (set to -1)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--target-unlabeled {root} is not a folder. Pass a folder of target-domain images.")
    folder = root / "train" if (root / "train").is_dir() else root
    from tl_deploy.preprocess import IMAGE_EXTENSIONS

    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if len(paths) < 2:
        raise DataError(f"--target-unlabeled {folder} holds {len(paths)} image(s): adaptation needs at least 2.")
    return [(p, -1) for p in paths]


def target_test_samples(root: str | Path, class_names: Sequence[str]) -> list[Sample] | None:
    """Labelled ``root/test`` with the source's classes (evaluation only), else None."""
    test = Path(root) / "test"
    if not test.is_dir():
        return None
    names, samples = scan_split(test, class_names)
    return samples if list(names) == list(class_names) else None


def cycle(loader: torch.utils.data.DataLoader) -> Iterator[torch.Tensor]:
    """Endless stream of target image batches; each pass reshuffles with the loader's generator."""
    while True:
        for x, _ in loader:
            yield x


# ----------------------------------------------------------------------------- the training-step hook

class DomainAdapter(nn.Module):
    """Replaces ``model(x)`` in a training step: source logits plus the weighted alignment loss.

    Holds the discriminator (DANN), the target batch stream and the training progress.
    """

    def __init__(self, method: str, feature_dim: int, weight: float, target_batches: Iterator[torch.Tensor],
                 total_steps: int, hidden: int = 256) -> None:
        super().__init__()
        if method not in DA_METHODS:
            raise DataError(f"Invalid --da {method!r}. Only {', '.join(DA_METHODS)} are supported.")
        self.method = method
        self.weight = weight
        self.total_steps = max(1, total_steps)
        self.steps_done = 0
        self.target_batches = target_batches
        self.discriminator = DomainDiscriminator(feature_dim, hidden) if method == "dann" else None
        self.align_sum, self.align_count = 0.0, 0

    def forward(self, model: nn.Module, x_source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) source batch -> ((B, C) source logits, weighted alignment loss)."""
        x_target = next(self.target_batches).to(x_source.device, non_blocking=True)
        x_target = x_target.contiguous(memory_format=torch.channels_last)  # (M, 3, H, W)
        n = len(x_source)
        feats = pooled_features(model, torch.cat([x_source, x_target]))  # (B+M, D)
        logits = model.get_classifier()(feats)  # type: ignore[operator]  # (B+M, C)
        if self.method == "dann":
            assert self.discriminator is not None
            coeff = dann_coefficient(self.steps_done / self.total_steps)
            domain_logits = self.discriminator(grad_reverse(feats.float(), coeff))  # (B+M,)
            is_source = torch.zeros_like(domain_logits)
            is_source[:n] = 1.0
            align = nn.functional.binary_cross_entropy_with_logits(domain_logits, is_source)
        elif self.method == "mmd":
            align = mk_mmd(feats[:n], feats[n:])
        else:
            align = coral(logits[:n], logits[n:])
        self.align_sum += float(align.detach())
        self.align_count += 1
        return logits[:n], self.weight * align

    def step_done(self) -> None:
        """Call after each optimiser step: advances the DANN schedule."""
        self.steps_done += 1

    def pop_mean_align_loss(self) -> float:
        """Mean alignment loss since the last call (for the epoch log)."""
        mean = self.align_sum / max(1, self.align_count)
        self.align_sum, self.align_count = 0.0, 0
        return mean
