"""The linear probe: the head alone, trained on cached features (the backbone never runs here)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from tl_deploy.train.loop import summarize
from tl_deploy.train.optim import build_optimizer, head_param_groups, warmup_cosine

_logger = logging.getLogger(__name__)


def log_epoch(row: dict[str, Any]) -> None:
    """One log line of a history row (probe or fine-tuning epoch)."""
    extra = f"  {row['seconds']:6.1f}s" if "seconds" in row else ""
    _logger.info("%-6s %3d  train loss %.4f acc %6.2f%%  val loss %.4f acc %6.2f%%%s", row["phase"], row["epoch"],
                 row["train_loss"], 100 * row["train_acc"], row["val_loss"], 100 * row["val_acc"], extra)


def _epoch_order(labels: torch.Tensor, sample_weights: torch.Tensor | None, seed: int) -> torch.Tensor:
    """This epoch's order of the training rows: shuffled, or drawn by a balanced sampler."""
    generator = torch.Generator().manual_seed(seed)
    if sample_weights is not None:
        return torch.multinomial(sample_weights[labels], len(labels), replacement=True, generator=generator)
    return torch.randperm(len(labels), generator=generator)


def train_probe(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                val_y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                label_smoothing: float, optimizer: str, seed: int, loss_weights: torch.Tensor | None = None,
                sample_weights: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Train ``head`` on (N, D) features for ``epochs``; keeps the head of the best val epoch.

    ``loss_weights`` weigh the classes in the loss, ``sample_weights`` (per class) draw a balanced
    order instead of a shuffle. Returns one history row per epoch.
    """
    opt = build_optimizer(head_param_groups(head, lr=lr, weight_decay=weight_decay), optimizer)
    steps_per_epoch = max(1, math.ceil(len(train_x) / batch_size))
    scheduler = warmup_cosine(opt, epochs * steps_per_epoch, 0)
    criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=label_smoothing)
    best = {k: v.clone() for k, v in head.state_dict().items()}
    best_acc, history = -1.0, []
    for epoch in range(epochs):
        order = _epoch_order(train_y, sample_weights, seed * 100_003 + epoch)
        head.train()
        total, correct = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss, logits = _step(head, criterion, opt, scheduler, train_x[idx], train_y[idx])
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == train_y[idx]).sum())
        head.eval()
        with torch.no_grad():
            val_logits = head(val_x)  # (N_val, C)
        val = summarize(val_logits, val_y, int(val_logits.shape[1]))
        row = {"phase": "probe", "epoch": epoch + 1, "train_loss": total / len(order),
               "train_acc": correct / len(order), "val_loss": val.loss, "val_acc": val.accuracy}
        history.append(row)
        log_epoch(row)
        if val.accuracy > best_acc:
            best_acc = val.accuracy
            best = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best)
    return history


def _step(head: nn.Module, criterion: nn.Module, opt: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler, x: torch.Tensor,
          y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer and schedule step of ``head`` on (B, D) features; returns (loss, (B, C) logits)."""
    logits = head(x)  # (B, C)
    loss = criterion(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    scheduler.step()
    return loss, logits


def train_probe_steps(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, *, steps: int, lr: float,
                      weight_decay: float, label_smoothing: float, seed: int, batch_size: int = 256,
                      loss_weights: torch.Tensor | None = None) -> tuple[float, float]:
    """Train ``head`` on (N, D) features for exactly ``steps`` AdamW steps of random full batches (up to
    ``batch_size`` rows), warm-up-free cosine decay; no validation. Returns the last step's loss and accuracy.

    A count of steps, not epochs: with a few labelled images an epoch is one or two steps, and the
    number of epochs that suits the whole data set would barely move the head.
    """
    opt = build_optimizer(head_param_groups(head, lr=lr, weight_decay=weight_decay), "adamw")
    scheduler = warmup_cosine(opt, steps, 0)
    criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=label_smoothing)
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch_size, len(train_x))
    loss, correct = torch.zeros(()), 0
    head.train()
    for _ in range(steps):
        idx = torch.randperm(len(train_x), generator=generator)[:batch]
        loss, logits = _step(head, criterion, opt, scheduler, train_x[idx], train_y[idx])
        correct = int((logits.argmax(1) == train_y[idx]).sum())
    head.eval()
    return float(loss.detach()), correct / batch
