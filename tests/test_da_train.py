"""Domain adaptation in training: the frozen-stage cache serves the target images, the mcc and self-train
losses, and the guard rails (collapsed epochs never selected, an all-collapsed run writes nothing)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tl_deploy.artifact import load_artifact
from tl_deploy.errors import TlDeployError
from tl_deploy.finetune import main
from tl_deploy.train import finetuning, stage_cache
from tl_deploy.train.adaptation import DomainAdapter, PseudoLabels, minimum_class_confusion
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.recipe import fit

from .conftest import make_image_folder
from .test_da import da_config
from .test_finetune import assert_one_error_line


def test_mcc_is_low_for_confident_diverse_predictions_and_high_for_confused_ones() -> None:
    diverse = 20.0 * torch.eye(4).repeat(3, 1)  # (12, 4): every class, confidently
    one_class = torch.zeros(12, 4)
    one_class[:, 0] = 20.0  # every image the same class
    uniform = torch.zeros(12, 4)
    assert float(minimum_class_confusion(diverse)) < 0.01
    assert float(minimum_class_confusion(one_class)) > 0.5
    assert float(minimum_class_confusion(uniform)) > 0.5
    logits = torch.randn(8, 4, requires_grad=True)
    minimum_class_confusion(logits).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_pseudo_labels_mask_unconfident_images_and_weigh_down_a_dominant_class() -> None:
    labels = PseudoLabels(num_classes=3, threshold=0.9, momentum=0.0)  # momentum 0: the last batch's frequency
    unsure = torch.zeros(4, 3)  # probability 1/3 each
    assert float(labels.loss(unsure)) == 0.0 and labels.pop_confident_fraction() == 0.0
    confident = torch.tensor([[9.0, 0, 0], [9.0, 0, 0], [9.0, 0, 0], [0, 9.0, 0]])
    loss = float(labels.loss(confident))
    assert labels.pop_confident_fraction() == 1.0
    ce = float(torch.nn.functional.cross_entropy(confident[:1], torch.tensor([0])))
    # class 0 holds 3/4 of the pseudo-labels: weight 1 / (3 * 0.75); class 1 (1/4 < 1/3): weight 1
    assert loss == pytest.approx((3 * ce / 2.25 + ce) / 4, rel=1e-4)


def test_adapter_on_cached_activations_uses_the_given_features_and_classifier() -> None:
    head = torch.nn.Linear(4, 3)
    suffix = torch.nn.Conv2d(2, 4, 1)

    def features(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        return module(h).mean((2, 3))  # (B, 4)

    target = torch.randn(5, 2, 3, 3)
    adapter = DomainAdapter("mcc", 4, 0.5, iter([target]), total_steps=4, classifier=head, features=features)
    source = torch.randn(6, 2, 3, 3)
    logits, loss = adapter(suffix, source)
    torch.testing.assert_close(logits, head(features(suffix, source)))
    torch.testing.assert_close(loss, 0.5 * minimum_class_confusion(head(features(suffix, target))))
    assert not list(adapter.parameters())  # the network's head is not the adapter's


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("target"), {"train": 8, "test": 4}, seed=7)


def lp_ft_config(data: Path, target: Path, out: Path, **overrides: object) -> TrainConfig:
    cfg = da_config(data, target, out, strategy="lp-ft", unfreeze=2, epochs=2, deterministic=True,
                    cache_runtime="torch", da="mcc")
    return replace(cfg, **overrides)  # type: ignore[arg-type]


def test_cached_da_run_matches_running_every_layer(tiny_data: Path, target_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = lp_ft_config(tiny_data, target_dir, tmp_path / "cached")
    cached = fit(cfg)
    monkeypatch.setattr(stage_cache, "ACTIVATION_CACHE_MAX_BYTES", 0)  # forces the every-layer path
    full = fit(replace(cfg, out=str(tmp_path / "full")))
    training = [json.loads((p / "config.json").read_text())["training"] for p in (cached, full)]
    assert [t["frozen_stage_cache"] for t in training] == [True, False]
    a, b = load_artifact(cached).model.state_dict(), load_artifact(full).model.state_dict()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-4, atol=1e-5, msg=key)
    metrics = json.loads((cached / "metrics.json").read_text())
    rows = [h for h in metrics["history"] if h["phase"] == "finetune"]
    assert all({"target_entropy", "target_effective_classes", "target_drift", "target_agreement"} <= set(r)
               for r in rows)
    stats = metrics["target_unlabeled_stats"]
    assert stats["images"] == 24 and stats["epoch"] == 2 and stats["collapsed_epochs"] == []
    assert 0.0 <= stats["agreement"] <= 1.0 and stats["reference"]["images"] == 24


def test_target_cache_takes_a_subset_when_memory_is_short(tiny_data: Path, target_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = lp_ft_config(tiny_data, target_dir, tmp_path / "run", epochs=1, da_batch_size=4)
    source_images = 3 * 24 + 3 * 8
    monkeypatch.setattr(finetuning, "collapse_reason", lambda stats, reference: None)  # a tiny model may collapse
    monkeypatch.setattr(stage_cache, "activation_bytes", lambda prefix, size, device: 1000)
    monkeypatch.setattr(stage_cache, "ACTIVATION_CACHE_MAX_BYTES", (source_images + 10) * 1000)
    with caplog.at_level(logging.INFO):
        path = fit(cfg)
    assert "of 10 of the 24 target images fit in memory" in caplog.text
    assert json.loads((path / "config.json").read_text())["training"]["frozen_stage_cache"]
    assert json.loads((path / "metrics.json").read_text())["target_unlabeled_stats"]["images"] == 10


def test_a_collapsed_epoch_is_never_selected(tiny_data: Path, target_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    verdicts = iter([None, "collapsed for the test"])  # epoch 1 fine, epoch 2 collapsed
    monkeypatch.setattr(finetuning, "collapse_reason", lambda stats, reference: next(verdicts))
    path = fit(lp_ft_config(tiny_data, target_dir, tmp_path / "run"))
    metrics = json.loads((path / "metrics.json").read_text())
    rows = [h for h in metrics["history"] if h["phase"] == "finetune"]
    assert [r["collapse"] for r in rows] == [None, "collapsed for the test"]
    assert metrics["target_unlabeled_stats"]["epoch"] == 1
    assert metrics["target_unlabeled_stats"]["collapsed_epochs"] == [2]


def test_a_run_whose_every_epoch_collapsed_writes_nothing(tiny_data: Path, target_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetuning, "collapse_reason", lambda stats, reference: "one class for every image")
    out = tmp_path / "run"
    with pytest.raises(TlDeployError, match="collapsed in every epoch .one class for every image.; no model was"):
        fit(lp_ft_config(tiny_data, target_dir, out))
    assert not out.exists() and not list(tmp_path.iterdir())  # no artifact, no checkpoint


def test_discriminator_that_wins_is_a_failure() -> None:
    adapter = DomainAdapter("dann", 4, 1.0, iter([]), total_steps=1)
    assert adapter.failure(0.01) is not None and "discriminator won" in str(adapter.failure(0.01))
    assert adapter.failure(0.6) is None
    assert DomainAdapter("mmd", 4, 1.0, iter([]), total_steps=1).failure(0.0) is None


@pytest.mark.parametrize("args, message", [
    (["--da", "mcc", "--target-unlabeled", "T", "--da-threshold", "0.9"], "--da-threshold does nothing with --da mcc"),
    (["--da-batch-size", "8"], "--da-batch-size does nothing without --da"),
])
def test_cli_refuses_da_options_that_do_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                args: list[str], message: str) -> None:
    code = main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), *args])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, message)
