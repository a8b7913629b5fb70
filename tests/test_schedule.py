"""The data-scaled schedule (``TrainConfig.resolve_schedule``) and the fast training path's equivalence."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from tl_deploy.artifact import load_artifact
from tl_deploy.backbones import backbone_stages, create_model, cut_after_stages, set_trainable
from tl_deploy.errors import TlDeployError
from tl_deploy.train.config import FINETUNE_EPOCHS, FINETUNE_TARGET_STEPS, PROBE_EPOCHS, TrainConfig
from tl_deploy.train.loaders import make_loader
from tl_deploy.train.loop import train_one_epoch
from tl_deploy.train.optim import build_optimizer, finetune_param_groups, warmup_cosine
from tl_deploy.train.recipe import fit

from .conftest import TINY_MODEL, TINY_SIZE
from .test_finetune import tiny_config


def test_the_default_data_keeps_its_schedule() -> None:
    cfg, record = TrainConfig().resolve_schedule(7000)  # Animal-Shape's train split, batch 32
    assert (cfg.epochs, cfg.probe_epochs) == (2, 20)
    assert record["epochs"] == 2 and "218 steps an epoch" in record["epochs_reason"]
    assert record["epochs_reason"].startswith("auto")


@pytest.mark.parametrize("images", [100, 1000, 7000, 100_000, 1_000_000])
def test_auto_epochs_give_a_budget_of_steps(images: int) -> None:
    cfg, _ = TrainConfig().resolve_schedule(images)
    per_epoch = images // cfg.batch_size
    assert cfg.epochs is not None and cfg.probe_epochs is not None
    assert FINETUNE_EPOCHS[0] <= cfg.epochs <= FINETUNE_EPOCHS[1]
    assert PROBE_EPOCHS[0] <= cfg.probe_epochs <= PROBE_EPOCHS[1]
    if cfg.epochs not in FINETUNE_EPOCHS:  # not clamped: within half an epoch of the target
        assert abs(cfg.epochs * per_epoch - FINETUNE_TARGET_STEPS) <= per_epoch / 2


def test_small_data_gets_more_epochs_and_large_data_one() -> None:
    small, _ = TrainConfig().resolve_schedule(100)
    middle, _ = TrainConfig().resolve_schedule(1000)
    large, _ = TrainConfig().resolve_schedule(100_000)
    assert small.epochs is not None and middle.epochs is not None
    assert small.epochs >= middle.epochs > 3 and large.epochs == 1
    assert small.probe_epochs is not None and small.probe_epochs > 20


def test_a_given_number_wins_and_is_recorded() -> None:
    cfg, record = TrainConfig(epochs=5, probe_epochs=3).resolve_schedule(100)
    assert (cfg.epochs, cfg.probe_epochs) == (5, 3)
    assert record["epochs_reason"] == "--epochs 5 (given)"
    assert record["probe_epochs_reason"] == "--probe-epochs 3 (given)"


def test_phases_the_strategy_lacks_are_not_resolved() -> None:
    linear, record = TrainConfig(strategy="linear").resolve_schedule(7000)
    assert linear.epochs is None and "epochs" not in record and record["probe_epochs"] == 20
    partial, record = TrainConfig(strategy="partial").resolve_schedule(7000)
    assert partial.probe_epochs is None and "probe_epochs" not in record and record["epochs"] == 2
    few_shot, record = TrainConfig(strategy="linear", limit_per_class=10).resolve_schedule(100)
    assert few_shot.few_shot_active and "probe_epochs" not in record  # it counts --few-shot-steps instead


def test_an_unresolved_schedule_has_no_number() -> None:
    with pytest.raises(TlDeployError, match="--epochs auto"):
        TrainConfig().resolved("epochs")
    assert TrainConfig(epochs=3).resolved("epochs") == 3


def test_the_run_records_and_uses_the_resolved_schedule(tiny_data: Path, tmp_path: Path) -> None:
    # 72 training images at batch 8: 9 steps an epoch, more than FINETUNE_TARGET_STEPS in the epoch cap.
    cfg = tiny_config(tiny_data, tmp_path / "auto", strategy="lp-ft", unfreeze=1, epochs=None, probe_epochs=None,
                      batch_size=24)
    path = fit(cfg)
    training = json.loads((path / "config.json").read_text())["training"]
    schedule = training["schedule"]
    want, _ = cfg.resolve_schedule(72)
    assert schedule["epochs"] == want.epochs == training["epochs"]
    assert schedule["probe_epochs"] == want.probe_epochs == training["probe_epochs"]
    assert schedule["epochs_reason"].startswith("auto: 72 images at batch 24 are 3 steps an epoch")
    history = json.loads((path / "metrics.json").read_text())["history"]
    assert sum(h["phase"] == "finetune" for h in history) == want.epochs
    assert sum(h["phase"] == "probe" for h in history) == want.probe_epochs


def _fast(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    """The project's path: the last stage and the head train on the frozen stages' cached outputs,
    channels_last, with the fused AdamW (``build_optimizer``) and ``train_one_epoch``."""
    set_trainable(model, 1)
    cut = cut_after_stages(model, len(backbone_stages(model)) - 1)
    assert cut is not None
    prefix, suffix = cut
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.no_grad():
        cached = prefix.eval()(inputs.contiguous(memory_format=torch.channels_last))  # (N, C, h, w)
    groups = finetune_param_groups(model, lr=1e-2, backbone_lr_mult=0.3, layer_decay=None, weight_decay=0.01)
    optimizer = build_optimizer(groups, "adamw")
    assert optimizer.defaults["fused"]
    scheduler = warmup_cosine(optimizer, epochs * len(inputs) // 8, 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    samples = [(f"{i}.png", int(y)) for i, y in enumerate(labels)]
    for epoch in range(epochs):
        loader = make_loader(samples, None, batch_size=8, seed=0, train=True, epoch=epoch, activations=cached)
        train_one_epoch(suffix, loader, optimizer, scheduler, criterion, torch.device("cpu"), None, None,
                        desc="train", bn_eval=True)


def _plain(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    """The reference: every layer runs on the images each step, contiguous tensors, the for-loop AdamW,
    the same batches in the same order (the loader's seeded shuffle)."""
    set_trainable(model, 1)
    model.eval()  # BatchNorm keeps its statistics (--bn eval); no dropout in this model
    groups = finetune_param_groups(model, lr=1e-2, backbone_lr_mult=0.3, layer_decay=None, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups, foreach=False, fused=False)
    scheduler = warmup_cosine(optimizer, epochs * len(inputs) // 8, 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    samples = [(f"{i}.png", int(y)) for i, y in enumerate(labels)]
    for epoch in range(epochs):
        for x, y in make_loader(samples, None, batch_size=8, seed=0, train=True, epoch=epoch, activations=inputs):
            loss = criterion(model(x.contiguous()), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()


def test_the_fast_path_trains_the_plain_model() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        start = create_model(TINY_MODEL, num_classes=3, weights="none", drop_rate=0.0)
        for m in start.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        inputs = torch.randn(24, 3, TINY_SIZE, TINY_SIZE)  # (N, 3, H, W)
        labels = torch.arange(24) % 3
        models = {}
        for name, train in (("fast", _fast), ("plain", _plain)):
            model = create_model(TINY_MODEL, num_classes=3, weights="none", drop_rate=0.0)
            model.load_state_dict(start.state_dict())
            train(model, inputs, labels, 2)
            models[name] = {k: v.contiguous() for k, v in model.state_dict().items()}
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    moved = 0
    for key, value in models["fast"].items():
        torch.testing.assert_close(value, models["plain"][key], rtol=1e-4, atol=1e-5, msg=key)
        moved += not torch.equal(value, start.state_dict()[key])
    assert moved > 0  # trained weights are compared, not two untouched copies
    stem = next(iter(models["fast"]))
    assert torch.equal(models["fast"][stem], start.state_dict()[stem])  # the frozen stages did not move


def test_test_split_is_scored_through_the_frozen_stage_pass(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "ort", strategy="lp-ft", epochs=1, unfreeze=2, deterministic=True,
                      cache_runtime="onnxruntime")
    path = fit(cfg)
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["eval_path"] == "frozen stages on onnxruntime, trained layers in PyTorch"
    from tl_deploy.evaluate import evaluate_artifact

    # The artifact's PyTorch model scores the same accuracy, float rounding apart.
    assert evaluate_artifact(load_artifact(path), tiny_data, "test").accuracy == pytest.approx(metrics["test_acc"])
    full = fit(replace(cfg, out=str(tmp_path / "full"), strategy="finetune", unfreeze="all"))
    assert json.loads((full / "metrics.json").read_text())["eval_path"] == "PyTorch"
