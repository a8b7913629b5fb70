"""The few-shot recipe: a linear probe that reaches far higher accuracy from a few labelled images per class.

The few-shot rule (``TrainConfig.few_shot_choice``): ``--strategy linear`` with ``--limit-per-class K``
and K <= ``FEW_SHOT_MAX_PER_CLASS`` uses it (``--few-shot on|off`` decides instead of the rule). The
run logs the verdict and its reason, and config.json records both (``few_shot_used``, ``few_shot_reason``).

What it changes against the plain probe, each chosen on the val split (docs/transfer.md, "Few-shot"):

- the network is ``tl_deploy.heads.MultiLevelClassifier``: one linear head on the pooled outputs of the
  backbone's last blocks and its final features, and flip test-time augmentation inside the network
  (the image and its mirror image, features averaged), so the export computes exactly what was scored;
- feature augmentation in the cache: ``--few-shot-views`` views of every training image (the image,
  its mirror image, random flips + affine transforms) go through the frozen backbone once;
- the head trains a fixed number of steps (``--few-shot-steps``) on full batches of those views,
  without validation-based epoch selection (val is scored once at the end, for the record).

The backbone stays frozen, so the artifact is the pretrained timm backbone plus the trained head.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tl_deploy.heads import MultiLevelClassifier
from tl_deploy.train import distributed
from tl_deploy.train.feature_cache import cached_features, compute_view_features
from tl_deploy.train.loop import summarize
from tl_deploy.train.probe import log_epoch, train_probe_steps
from tl_deploy.train.run import Run
from tl_deploy.train.setup import weights_identity

_logger = logging.getLogger(__name__)


def view_features(run: Run, network: MultiLevelClassifier, split: str, views: int,
                  cache_dir: Path | None) -> torch.Tensor:
    """(N, V, D) multi-level features of ``views`` views of the split's images, from the on-disk cache."""
    cfg = run.cfg
    samples = run.train_samples if split == "train" else run.splits.get(split)
    model_id = (f"{weights_identity(cfg.model, cfg.weights, cfg.seed)}|multi-level:{network.levels}"
                f"|views:{views}:{cfg.seed}")

    def compute() -> torch.Tensor:
        return compute_view_features(network.pooled_levels, network, samples, run.spec, views=views,
                                     seed=cfg.seed, device=run.device, batch_size=run.eval_batch,
                                     desc=f"{split} views")

    return cached_features(network, model_id, samples, run.spec, device=run.device, cache_dir=cache_dir,
                           desc=f"{split} views", compute=compute, dist=run.dist)


def few_shot_probe(run: Run, network: MultiLevelClassifier, cache_dir: Path | None) -> dict[str, Any]:
    """Train the multi-level head on cached augmented views; returns the history row (val scored once)."""
    cfg = run.cfg
    train = view_features(run, network, "train", cfg.few_shot_views, cache_dir)  # (N, V, D)
    # The network averages the features of an image and of its mirror image: views 0 and 1, averaged.
    val = view_features(run, network, "val", 2, cache_dir).mean(dim=1)  # (N_val, D)
    train_y = torch.tensor([label for _, label in run.train_samples])
    val_y = torch.tensor([label for _, label in run.splits.val])
    _logger.info("few-shot head: %d images x %d views = %d rows of %d features, %d steps", len(train_y),
                 cfg.few_shot_views, train.shape[0] * train.shape[1], train.shape[2], cfg.few_shot_steps)
    head = network.get_classifier().float().cpu()
    loss, acc = train_probe_steps(
        head, train.flatten(0, 1), train_y.repeat_interleave(cfg.few_shot_views), steps=cfg.few_shot_steps,
        lr=cfg.probe_lr, weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing, seed=cfg.seed,
        loss_weights=run.loss_weights())
    with torch.no_grad():
        val_logits = head(val)  # (N_val, C)
    scored = summarize(val_logits, val_y, int(val_logits.shape[1]))
    row = {"phase": "probe", "epoch": 1, "steps": cfg.few_shot_steps, "train_loss": loss, "train_acc": acc,
           "val_loss": scored.loss, "val_acc": scored.accuracy}
    log_epoch(row)
    distributed.broadcast_module(head, run.dist)  # every rank trained the same head; rank 0's is kept
    head.to(run.device)
    return row
