"""Unsupervised domain adaptation: labelled source images, unlabelled target images.

    python -m tl_deploy.finetune --data SOURCE_DIR --target-unlabeled TARGET_DIR --da METHOD

Each method adds one loss on a batch of unlabelled target images to the source classification loss,
following its paper:

- ``dann`` (Ganin et al., JMLR 2016): a domain discriminator on the pooled features, trained through a
  gradient-reversal layer whose coefficient ramps as ``2 / (1 + exp(-10 p)) - 1`` with training
  progress ``p`` in [0, 1] (the paper's warm-up schedule), so the backbone learns features the
  discriminator cannot tell apart.
- ``mmd`` (Long et al., DAN, ICML 2015): multi-kernel MMD between source and target pooled features,
  a sum of 5 Gaussian kernels with bandwidths ``b * 2**k`` (k = -2..2) around the batch's mean
  squared distance ``b``; the unbiased estimator.
- ``coral`` (Sun and Saenko, Deep CORAL, ECCV-W 2016): ``||C_s - C_t||_F^2 / (4 d^2)`` between the
  covariances of the source and target outputs of the last layer (the logits, as in the paper).
- ``mcc`` (Jin et al., Minimum Class Confusion, ECCV 2020): the target predictions' class confusion
  ``P^T W P`` (softmax at temperature 2.5, images weighted by ``1 + exp(-entropy)``, rows normalised),
  whose off-diagonal mass is minimised: confident *and* diverse target predictions, no discriminator.
- ``self-train`` (FixMatch's confidence mask, Sohn et al., NeurIPS 2020, without strong augmentation):
  cross-entropy of the target images on their own top-1 class where its probability is at least
  ``--da-threshold``; each pseudo-label is weighted down by how over-represented its class is among
  the recent pseudo-labels (a running class frequency), so one class cannot take over the target.

With the frozen-stage cache (``tl_deploy.train.stage_cache``) the target images are treated as the
source images are: their frozen-stage outputs are computed once, and every step runs only the trained
layers on cached source and target activations.

Only the trained classifier is kept: the artifact is a normal one. Model selection uses held-out
*source* validation images; target labels, if the target folder has any, are read only to report
target test accuracy after training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_deploy.backbones import pooled_features
from tl_deploy.data import Sample, scan_split
from tl_deploy.errors import DataError

_logger = logging.getLogger(__name__)

DA_METHODS = ("dann", "mmd", "coral", "mcc", "self-train")
MCC_TEMPERATURE = 2.5  # the paper's value for every benchmark
# A domain discriminator whose loss falls below this has won (chance is ln 2 = 0.69): DANN's failure mode.
DISCRIMINATOR_WIN_LOSS = 0.05

Features = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (trained module, input batch) -> (B, D)


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


def minimum_class_confusion(logits: torch.Tensor, temperature: float = MCC_TEMPERATURE) -> torch.Tensor:
    """MCC loss of (M, C) target logits: the mean off-diagonal class confusion, in [0, 1)."""
    m, c = logits.shape
    if m < 2:
        raise DataError(f"MCC needs at least 2 target samples per batch, got {m}.")
    p = torch.softmax(logits.float() / temperature, dim=1)  # (M, C)
    entropy = -(p * torch.log(p + 1e-5)).sum(1).detach()  # (M,)
    weight = 1.0 + torch.exp(-entropy)
    weight = m * weight / weight.sum()  # (M,): confident images count more
    confusion = (p * weight[:, None]).T @ p  # (C, C)
    confusion = confusion / confusion.sum(1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / c


class PseudoLabels:
    """Confident target pseudo-labels, weighted against the classes that recent pseudo-labels over-represent."""

    def __init__(self, num_classes: int, threshold: float, momentum: float = 0.99) -> None:
        self.threshold = threshold
        self.momentum = momentum
        self.class_frequency = torch.full((num_classes,), 1.0 / num_classes)  # running, of confident labels
        self.confident_sum, self.seen = 0, 0

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Masked, class-balanced cross-entropy of (M, C) target logits on their own confident top-1 class."""
        probs = torch.softmax(logits.detach().float(), dim=1)  # (M, C)
        confidence, labels = probs.max(1)  # (M,), (M,)
        mask = confidence >= self.threshold  # (M,)
        c = len(self.class_frequency)
        if mask.any():
            batch = torch.bincount(labels[mask].cpu(), minlength=c).float() / int(mask.sum())
            self.class_frequency = self.momentum * self.class_frequency + (1 - self.momentum) * batch
        # A class predicted more often than 1/C weighs 1/(C f) < 1; rarer classes keep weight 1.
        balance = (1.0 / (c * self.class_frequency)).clamp(max=1.0).to(logits.device)  # (C,)
        weight = mask.float() * balance[labels]  # (M,)
        self.confident_sum += int(mask.sum())
        self.seen += len(mask)
        per_image = nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # (M,)
        return (weight * per_image).sum() / len(logits)  # FixMatch: the mean over the whole batch

    def pop_confident_fraction(self) -> float:
        """Share of the target images above the threshold since the last call."""
        fraction = self.confident_sum / max(1, self.seen)
        self.confident_sum, self.seen = 0, 0
        return fraction


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
    """Replaces ``model(x)`` in a training step: source logits plus the weighted adaptation loss.

    Holds the discriminator (DANN), the pseudo-label state (self-training), the target batch stream
    and the training progress. ``features`` maps (the module the step trains, a batch) to the pooled
    features and ``classifier`` maps those to logits: the whole network on images, or the layers after
    the frozen-stage cut on cached activations.
    """

    def __init__(self, method: str, feature_dim: int, weight: float, target_batches: Iterator[torch.Tensor],
                 total_steps: int, hidden: int = 256, *, classifier: nn.Module | None = None,
                 features: Features = pooled_features, num_classes: int | None = None,
                 threshold: float = 0.8) -> None:
        super().__init__()
        if method not in DA_METHODS:
            raise DataError(f"Invalid --da {method!r}. Only {', '.join(DA_METHODS)} are supported.")
        self.method = method
        self.weight = weight
        self.total_steps = max(1, total_steps)
        self.steps_done = 0
        self.target_batches = target_batches
        self.features = features
        self._classifier = [classifier]  # a list: the network's own head, not a module of the adapter
        self.discriminator = DomainDiscriminator(feature_dim, hidden) if method == "dann" else None
        self.pseudo_labels = None
        if method == "self-train":
            if num_classes is None:
                raise ValueError("self-train needs num_classes")
            self.pseudo_labels = PseudoLabels(num_classes, threshold)
        self.align_sum, self.align_count = 0.0, 0

    def forward(self, model: nn.Module, x_source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source batch (images or cached activations) -> ((B, C) source logits, weighted adaptation loss)."""
        x_target = next(self.target_batches).to(x_source.device, non_blocking=True)
        if x_target.ndim == 4:
            x_target = x_target.contiguous(memory_format=torch.channels_last)  # (M, C, H, W)
        n = len(x_source)
        feats = self.features(model, torch.cat([x_source, x_target]))  # (B+M, D)
        classifier = self._classifier[0] or model.get_classifier()  # type: ignore[operator]
        logits = classifier(feats)  # (B+M, C)
        if self.method == "dann":
            assert self.discriminator is not None
            coeff = dann_coefficient(self.steps_done / self.total_steps)
            domain_logits = self.discriminator(grad_reverse(feats.float(), coeff))  # (B+M,)
            is_source = torch.zeros_like(domain_logits)
            is_source[:n] = 1.0
            align = nn.functional.binary_cross_entropy_with_logits(domain_logits, is_source)
        elif self.method == "mmd":
            align = mk_mmd(feats[:n], feats[n:])
        elif self.method == "coral":
            align = coral(logits[:n], logits[n:])
        elif self.method == "mcc":
            align = minimum_class_confusion(logits[n:])
        else:
            assert self.pseudo_labels is not None
            align = self.pseudo_labels.loss(logits[n:])
        self.align_sum += float(align.detach())
        self.align_count += 1
        return logits[:n], self.weight * align

    def step_done(self) -> None:
        """Call after each optimiser step: advances the DANN schedule."""
        self.steps_done += 1

    def pop_epoch_stats(self) -> dict[str, float]:
        """The epoch's adaptation figures since the last call, for its history row: the mean (unweighted)
        adaptation loss, and with self-training the share of target images above the threshold."""
        row = {"align_loss": self.align_sum / max(1, self.align_count)}
        self.align_sum, self.align_count = 0.0, 0
        if self.pseudo_labels is not None:
            row["pseudo_label_fraction"] = self.pseudo_labels.pop_confident_fraction()
        return row

    def failure(self, align_loss: float) -> str | None:
        """Why this epoch's adaptation loss says the method failed (a DANN discriminator that wins), or None."""
        if self.method == "dann" and align_loss < DISCRIMINATOR_WIN_LOSS:
            return (f"the domain discriminator won (its loss {align_loss:.3f} is below {DISCRIMINATOR_WIN_LOSS}; "
                    f"chance is 0.69): source and target features are told apart")
        return None
