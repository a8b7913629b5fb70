"""Optimizers, parameter groups and the warm-up + cosine schedule.

Leaf functions take explicit arguments; ``optimizer_kwargs(cfg)`` is the one adapter from a
``TrainConfig`` to them (timm's pattern).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from tl_deploy.train.config import TrainConfig


def optimizer_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The fine-tuning parameter-group arguments of ``finetune_param_groups`` that ``cfg`` sets."""
    return {"lr": cfg.lr, "backbone_lr_mult": cfg.backbone_lr_mult, "layer_decay": cfg.layer_decay,
            "weight_decay": cfg.weight_decay}


def build_optimizer(params: list[dict[str, Any]], name: str) -> torch.optim.Optimizer:
    """``name`` (adamw or sgd) over ``params`` (groups that carry their own lr and weight decay)."""
    # The fused kernels (CPU and CUDA) make the same update in one pass over the parameters: a step of
    # the default run's 3.3M trained parameters takes ~6 ms instead of ~18 ms on 2 cores.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in params for p in g["params"])
    if name == "sgd":
        return torch.optim.SGD(params, momentum=0.9, nesterov=True, fused=fused)
    return torch.optim.AdamW(params, fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiple of each group's LR at ``step``: linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's LR, then cosine decay to zero, stepped per batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))


def finetune_param_groups(model: nn.Module, *, lr: float, backbone_lr_mult: float, layer_decay: float | None,
                          weight_decay: float) -> list[dict[str, Any]]:
    """Head at ``lr``; backbone at ``lr * backbone_lr_mult`` or with layer-wise decay (``layer_decay``).
    No weight decay on biases and norm parameters. Only parameters that require gradients."""
    if layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
        for g in groups:
            g["lr"] = lr * g.pop("lr_scale", 1.0)
            g["params"] = [p for p in g["params"] if p.requires_grad]
        return [g for g in groups if g["params"]]
    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((id(p) in head_ids, p.ndim <= 1), []).append(p)
    out = []
    for (is_head, no_decay), params in buckets.items():
        group_lr = lr if is_head else lr * backbone_lr_mult
        out.append({"params": params, "lr": group_lr, "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def head_param_groups(head: nn.Module, *, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """A probe's groups: weights decay, biases and norm parameters do not."""
    return [{"params": [p for p in head.parameters() if p.ndim > 1], "weight_decay": weight_decay, "lr": lr},
            {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]
