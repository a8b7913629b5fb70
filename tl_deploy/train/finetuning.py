"""The fine-tuning phase: the unfrozen layers train for ``--epochs`` with warm-up + cosine; the best
val epoch is kept, and every epoch is checkpointed for ``--resume``.

With ``--da`` each epoch is also scored without labels on a fixed set of target images
(``TargetWatch``): prediction entropy, effective classes, drift and agreement against the model
fine-tuning started from. An epoch whose target predictions collapsed (or whose DANN discriminator
won) is never selected; when every epoch collapsed the run stops with an error and writes no artifact.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from tl_deploy.backbones import pooled_features, set_trainable
from tl_deploy.data import Sample, eval_transform, train_transform
from tl_deploy.errors import TlDeployError
from tl_deploy.reports import ClassificationResult
from tl_deploy.train import distributed
from tl_deploy.train.adaptation import DomainAdapter, cycle
from tl_deploy.train.checkpoint import checkpoint_mismatch
from tl_deploy.train.loaders import make_loader
from tl_deploy.train.loop import evaluate, predict_logits, summarize, train_one_epoch
from tl_deploy.train.optim import build_optimizer, finetune_param_groups, optimizer_kwargs, warmup_cosine
from tl_deploy.train.probe import log_epoch
from tl_deploy.train.run import Run
from tl_deploy.train.stage_cache import StageCache
from tl_deploy.train.target_stats import TargetStats, collapse_reason, target_stats

_logger = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]

TARGET_WATCH_IMAGES = 1000  # unlabelled target images scored each epoch (a fixed random subset)


def finetune(run: Run, network: nn.Module, cache: StageCache) -> dict[str, Any] | None:
    """Train the unfrozen layers of ``network``; leaves it with the weights of the best val epoch.

    With a frozen-stage cut in ``cache``, the epochs run only the layers after the cut, on the cached
    outputs of the frozen stages. With ``--da``, returns the selected epoch's label-free target
    statistics (metrics.json's ``target_unlabeled_stats``); else None.
    """
    cfg, state = run.cfg, run.state
    set_trainable(network, cfg.stages_to_train())
    trained = cache.suffix or network  # the layers each epoch runs
    stepped = distributed.data_parallel(trained, run.dist, sync_bn=cfg.sync_bn)  # after freezing: DDP's wrapper
    per_epoch, epochs = steps_per_epoch(run), cfg.resolved("epochs")
    adapter = make_adapter(run, network, cache, epochs * per_epoch)
    watch = TargetWatch(run, network, cache) if adapter is not None else None
    optimizer, scheduler = make_optimization(run, network, adapter, per_epoch)
    best = restore_optimization(run, optimizer, scheduler)
    scaler = torch.amp.GradScaler("cuda") if run.amp.dtype == torch.float16 else None
    criterion = nn.CrossEntropyLoss(weight=_to(run.loss_weights(), run.device), label_smoothing=cfg.label_smoothing)
    transform = train_transform(run.spec, cfg.augment)
    start_epoch = state.epoch if state.phase == "finetune" else 0
    state.phase = "finetune"
    for epoch in range(start_epoch, epochs):
        # Augmentation + dropout per epoch; each rank draws its own.
        torch.manual_seed(cfg.seed * 100_003 + 7919 * (epoch + 1) + run.dist.rank)
        t0 = time.perf_counter()
        loader = make_loader(run.train_samples, transform, batch_size=cfg.batch_size, seed=cfg.seed, train=True,
                             epoch=epoch, workers=run.workers, sample_weights=run.sample_weights(),
                             activations=cache.activations.get("train"), accum_steps=cfg.grad_accum_steps,
                             dist=run.dist)
        train_loss, train_acc = train_one_epoch(stepped, loader, optimizer, scheduler, criterion, run.device,
                                                run.amp.dtype, scaler, desc=f"epoch {epoch + 1}/{epochs}",
                                                bn_eval=cfg.bn == "eval", accum_steps=cfg.grad_accum_steps,
                                                dist=run.dist, adapter=adapter)
        val = validate(run, network, cache)
        row = {"phase": "finetune", "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val.loss, "val_acc": val.accuracy, "seconds": 0.0,
               "lr": max(g["lr"] for g in optimizer.param_groups)}
        if adapter is not None and watch is not None:
            row.update(adapter.pop_epoch_stats())
            row.update(watch.score_epoch(epoch + 1, adapter.failure(row["align_loss"])))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        best = record_epoch(run, network, row, best)
        run.ckpt.save(network, optimizer, scheduler, state, best=best)
        if cfg.patience is not None and state.stale_epochs >= cfg.patience:
            _logger.info("early stop: val accuracy has not improved for %d epochs", cfg.patience)
            break
    if watch is not None and state.best_epoch < 1:
        run.ckpt.clear()
        raise TlDeployError(f"--da {cfg.da} collapsed in every epoch ({watch.last_reason}); no model was written. "
                            f"Lower --da-weight (now {cfg.da_weight:g}) or choose another --da method.")
    if best is not None and state.best_epoch != state.epoch:
        _logger.info("restoring the best val epoch (%d, val acc %.2f%%)", state.best_epoch, 100 * state.best_acc)
        network.load_state_dict(best)
    for p in network.parameters():
        p.requires_grad_(True)
    return watch.selected(state.best_epoch, run.splits.class_names) if watch is not None else None


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return tensor.to(device) if tensor is not None else None


def steps_per_epoch(run: Run) -> int:
    """Optimizer steps of one epoch on this process."""
    loader = make_loader(run.train_samples, None, batch_size=run.cfg.batch_size, seed=run.cfg.seed, train=True,
                         accum_steps=run.cfg.grad_accum_steps, dist=run.dist)
    return len(loader) // run.cfg.grad_accum_steps


def make_adapter(run: Run, network: nn.Module, cache: StageCache, total_steps: int) -> DomainAdapter | None:
    """The domain-adaptation hook for the training step, or None without --da. With the target images'
    frozen-stage outputs in ``cache``, the target batches are those activations; else images."""
    cfg = run.cfg
    if cfg.da is None or cfg.target_unlabeled is None:
        return None
    target = run.target_samples
    activations = cache.activations.get("target") if cache.suffix is not None else None
    if activations is not None:
        target = target[:len(activations)]  # only the labels (-1) are read: the activations are the images
    _logger.info("domain adaptation %s (weight %g): %d unlabelled target images from %s%s", cfg.da, cfg.da_weight,
                 len(target), cfg.target_unlabeled,
                 ", their frozen-stage outputs cached" if activations is not None else "")
    # Plain shuffling (never the class-balanced sampler: the target images have no labels).
    loader = make_loader(target, train_transform(run.spec, cfg.augment), batch_size=cfg.da_batch_size,
                         seed=cfg.seed, train=True, epoch=10_007, workers=run.workers, activations=activations,
                         accum_steps=cfg.grad_accum_steps)
    adapter = DomainAdapter(cfg.da, int(network.num_features), cfg.da_weight, cycle(loader),  # type: ignore[arg-type]
                            total_steps, classifier=network.get_classifier(),  # type: ignore[operator]
                            features=_suffix_features if cache.suffix is not None else pooled_features,
                            num_classes=run.num_classes, threshold=cfg.da_threshold)
    return adapter.to(run.device)


def _suffix_features(suffix: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) cached frozen-stage outputs -> (B, D) pooled features of the layers after the cut."""
    return suffix(h, pre_logits=True)  # type: ignore[no-any-return]


class TargetWatch:
    """The guard rails of a domain-adaptation run: each epoch's predictions on a fixed random subset of the
    unlabelled target images, against those of the model fine-tuning starts from (the source-only linear
    probe with lp-ft), which are computed once."""

    def __init__(self, run: Run, network: nn.Module, cache: StageCache) -> None:
        self.run = run
        self.model = cache.suffix or network
        generator = torch.Generator().manual_seed(run.cfg.seed)
        activations = cache.activations.get("target") if cache.suffix is not None else None
        available = len(activations) if activations is not None else len(run.target_samples)
        keep = torch.randperm(available, generator=generator)[:TARGET_WATCH_IMAGES].sort().values
        self.loader: torch.utils.data.DataLoader
        if activations is not None:
            x = activations[keep]  # (K, C, h, w)
            dataset = torch.utils.data.TensorDataset(x, torch.full((len(x),), -1))
            self.loader = torch.utils.data.DataLoader(dataset, batch_size=run.eval_batch)
        else:
            self.loader = make_loader([run.target_samples[i] for i in keep.tolist()], eval_transform(run.spec),
                                      batch_size=run.eval_batch, seed=0, train=False, workers=run.workers)
        self.reference_logits = self.logits()  # (K, C), the starting model's
        self.reference = target_stats(self.reference_logits)
        self.by_epoch: dict[int, tuple[TargetStats, str | None]] = {}
        self.last_reason: str | None = None
        _logger.info("target guard rails on %d unlabelled target images; the starting model: %s",
                     len(self.reference_logits), self.reference.summary())

    def logits(self) -> torch.Tensor:
        """(K, C) logits of the watched target images under the current weights."""
        return predict_logits(self.model, self.loader, self.run.device, self.run.amp.dtype, desc="target stats")[0]

    def score_epoch(self, epoch: int, failure: str | None) -> dict[str, Any]:
        """This epoch's target statistics as history-row fields; ``collapse`` names why it cannot be
        selected (a collapse of its target predictions, else ``failure``), or is None."""
        stats = target_stats(self.logits(), self.reference_logits)
        reason = collapse_reason(stats, self.reference) or failure
        self.by_epoch[epoch] = (stats, reason)
        _logger.info("epoch %d: %s", epoch, stats.summary())
        if reason is not None:
            self.last_reason = reason
            _logger.warning("epoch %d is not eligible as the final model: %s", epoch, reason)
        return {"target_entropy": round(stats.mean_entropy, 4),
                "target_effective_classes": round(stats.effective_classes, 3),
                "target_drift": round(stats.drift or 0.0, 4), "target_agreement": round(stats.agreement or 0.0, 4),
                "collapse": reason}

    def selected(self, epoch: int, class_names: list[str]) -> dict[str, Any]:
        """metrics.json's ``target_unlabeled_stats``: the selected epoch's statistics and the reference's."""
        stats, _ = self.by_epoch[epoch]
        return {**stats.to_dict(class_names), "epoch": epoch,
                "reference": {**self.reference.to_dict(class_names), "model": "the starting model (before "
                              "fine-tuning), on the same target images"},
                "collapsed_epochs": [e for e, (_, reason) in self.by_epoch.items() if reason is not None]}


def make_optimization(run: Run, network: nn.Module, adapter: DomainAdapter | None,
                      per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over the trained parameters (and a domain discriminator's), and its schedule over
    ``--epochs`` of ``per_epoch`` steps."""
    cfg = run.cfg
    groups = finetune_param_groups(network, **optimizer_kwargs(cfg))
    if adapter is not None and adapter.discriminator is not None:
        groups.append({"params": list(adapter.discriminator.parameters()), "lr": cfg.lr,
                       "weight_decay": cfg.weight_decay})
    optimizer = build_optimizer(groups, cfg.optimizer)
    return optimizer, warmup_cosine(optimizer, cfg.resolved("epochs") * per_epoch, int(cfg.warmup_epochs * per_epoch))


def restore_optimization(run: Run, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler) -> Weights | None:
    """With ``--resume`` in the middle of fine-tuning: the optimizer and schedule state, and the best
    weights so far. None when starting afresh."""
    if run.resumed is None or run.state.phase != "finetune" or run.state.epoch == 0:
        return None
    try:
        optimizer.load_state_dict(run.resumed["optimizer"])
        scheduler.load_state_dict(run.resumed["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise checkpoint_mismatch(exc, "optimizer state") from exc
    best: Weights | None = run.resumed.get("best")
    return best


def score_cached(run: Run, suffix: nn.Module, samples: list[Sample], activations: torch.Tensor,
                 amp: torch.dtype | None, desc: str) -> ClassificationResult:
    """Metrics of the layers after the cut, run on ``samples``' frozen-stage outputs."""
    loader = make_loader(samples, None, batch_size=run.eval_batch, seed=run.cfg.seed, train=False,
                         activations=activations)
    return summarize(*predict_logits(suffix, loader, run.device, amp, desc=desc), run.num_classes)


def validate(run: Run, network: nn.Module, cache: StageCache) -> ClassificationResult:
    """This epoch's val metrics: on the cached frozen-stage outputs when there are some."""
    if cache.suffix is not None:
        return score_cached(run, cache.suffix, run.splits.val, cache.activations["val"], run.amp.dtype, "val")
    return evaluate(network, run.splits.val, run.spec, batch_size=run.cfg.batch_size, device=run.device,
                    amp=run.amp.dtype, workers=run.workers, num_classes=run.num_classes, desc="val", dist=run.dist)


def record_epoch(run: Run, network: nn.Module, row: dict[str, Any], best: Weights | None) -> Weights | None:
    """Log and keep the epoch's row; returns the best weights so far (these, when val improved)."""
    state = run.state
    state.history.append(row)
    log_epoch(row)
    state.epoch = row["epoch"]
    if row.get("collapse") is None and row["val_acc"] > state.best_acc:  # a collapsed epoch is never selected
        state.best_acc, state.best_epoch, state.stale_epochs = row["val_acc"], row["epoch"], 0
        return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    state.stale_epochs += 1
    return best
