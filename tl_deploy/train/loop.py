"""The epoch loop and evaluation: ``train_one_epoch``, ``predict_logits``, ``summarize``, ``evaluate``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tl_deploy.backbones import frozen_modules
from tl_deploy.data import Sample, eval_transform
from tl_deploy.errors import TlDeployError
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.reports import ClassificationResult, classification_result
from tl_deploy.train import distributed
from tl_deploy.train.adaptation import DomainAdapter
from tl_deploy.train.distributed import SINGLE, DistContext
from tl_deploy.train.loaders import make_loader


def autocast(device: torch.device, amp: torch.dtype | None) -> Any:
    """Autocast to ``amp`` on ``device`` (None: off, fp32)."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def set_train_mode(model: nn.Module, bn_eval: bool) -> None:
    """Training mode, except frozen layers and (``bn_eval``) every BatchNorm, which keep their statistics."""
    model.train()
    for module in frozen_modules(model):
        module.eval()  # frozen layers' BatchNorm keeps its running statistics
    if bn_eval:
        # Batch statistics of a new domain differ from the source's; normalising with them shifts every
        # feature the (probed) head relies on. ImageNet statistics keep the features, affine params adapt.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module, device: torch.device,
                    amp: torch.dtype | None, scaler: torch.amp.GradScaler | None, desc: str,
                    bn_eval: bool = False, accum_steps: int = 1, dist: DistContext = SINGLE,
                    adapter: DomainAdapter | None = None) -> tuple[float, float]:
    """One pass over the loader; returns (mean loss, accuracy) on the augmented training images of all
    processes. An optimizer step follows every ``accum_steps`` micro-batches (an incomplete last group is
    skipped, as a single process drops an incomplete last batch). With ``adapter`` (domain adaptation)
    each step also draws a target batch and adds its alignment loss."""
    set_train_mode(model, bn_eval)
    total_loss, correct, seen = 0.0, 0, 0
    micro_batches = len(loader) // accum_steps * accum_steps
    bar = tqdm(itertools.islice(loader, micro_batches), total=micro_batches, desc=desc, leave=False,
               disable=distributed.tqdm_disable())
    for i, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        y = y.to(device, non_blocking=True)  # (B,)
        step = (i + 1) % accum_steps == 0  # last micro-batch of an optimizer step: DDP all-reduces now
        with distributed.no_sync(model, step):
            with autocast(device, amp):
                if adapter is None:
                    logits = model(x)  # (B, C)
                    loss = criterion(logits.float(), y)
                else:
                    logits, align_loss = adapter(model, x)  # (B, C), scalar
                    loss = criterion(logits.float(), y) + align_loss.float()
            if not torch.isfinite(loss):
                raise TlDeployError(f"Training diverged (loss {loss.item()}): lower --lr or disable --amp.")
            if i % accum_steps == 0:
                optimizer.zero_grad(set_to_none=True)
            # Mean over the micro-batch / accum_steps, then DDP's mean over processes: the global batch mean.
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if step:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if adapter is not None:
                adapter.step_done()
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    loss_sum, correct_sum, count = distributed.all_reduce_sum([total_loss, correct, seen], dist)
    return loss_sum / max(1, count), correct_sum / max(1, count)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                   amp: torch.dtype | None, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float32 logits and (N,) labels, eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=distributed.tqdm_disable()):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            all_logits.append(model(x).float().cpu())
        all_labels.append(y)
    return torch.cat(all_logits), torch.cat(all_labels)


def summarize(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassificationResult:
    """Loss, accuracy and confusion of (N, C) ``logits`` against (N,) ``labels``."""
    loss = float(nn.functional.cross_entropy(logits, labels)) if len(labels) else float("nan")
    return classification_result(labels.numpy(), logits.argmax(1).numpy(), num_classes, loss)


def evaluate(model: nn.Module, samples: Sequence[Sample], spec: PreprocessSpec, *, batch_size: int,
             device: torch.device, amp: torch.dtype | None, workers: int, num_classes: int,
             desc: str = "eval", dist: DistContext = SINGLE) -> ClassificationResult:
    """Metrics of the whole split: each rank predicts its block, the logits are gathered on every rank.
    ``model`` is the plain module, not the DDP wrapper (ranks run different numbers of batches)."""
    part = distributed.shard(samples, dist)
    loader = make_loader(part, eval_transform(spec), batch_size=batch_size, seed=0, train=False, workers=workers)
    logits, labels = (predict_logits(model, loader, device, amp, desc) if part
                      else (torch.empty(0, num_classes), torch.empty(0, dtype=torch.int64)))
    return summarize(distributed.all_gather_cat(logits, dist), distributed.all_gather_cat(labels, dist), num_classes)
