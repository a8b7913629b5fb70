"""The few-shot recipe: the rule and its record, the multi-level head with flip TTA, the cached views, export."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tl_deploy.artifact import load_artifact
from tl_deploy.backbones import create_model, pooled_features
from tl_deploy.data import eval_transform, load_splits
from tl_deploy.errors import TlDeployError
from tl_deploy.export import ExportOptions, export_artifact
from tl_deploy.heads import MULTI_LEVEL_HEAD, MultiLevelClassifier, create_multi_level_model
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.train.config import FEW_SHOT_MAX_PER_CLASS, TrainConfig
from tl_deploy.train.feature_cache import compute_features, compute_view_features, mirror_transform
from tl_deploy.train.recipe import fit

from .conftest import TINY_CLASSES, TINY_MODEL, TINY_SIZE


def few_shot_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(data=str(data), model=TINY_MODEL, weights="none", img_size=TINY_SIZE,
                       crop_pct=1.0, interpolation="bilinear", strategy="linear",
                       limit_per_class=5, few_shot_views=4, few_shot_steps=30, probe_lr=1e-2, out=str(out),
                       no_cache=True, workers=0, device="cpu", threads=2)
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def few_shot_artifact(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(few_shot_config(tiny_data, tmp_path_factory.mktemp("few_shot") / "run"))


# ----------------------------------------------------------------------------- the rule

@pytest.mark.parametrize(("overrides", "active", "reason"), [
    ({"strategy": "linear", "limit_per_class": 10}, True, "--limit-per-class 10 <= 20"),
    ({"strategy": "linear", "limit_per_class": FEW_SHOT_MAX_PER_CLASS}, True, "<= 20"),
    ({"strategy": "linear", "limit_per_class": FEW_SHOT_MAX_PER_CLASS + 1}, False, "more than 20"),
    ({"strategy": "linear"}, False, "all images"),
    ({"limit_per_class": 10}, False, "--strategy lp-ft trains the backbone"),
    ({"strategy": "linear", "limit_per_class": 10, "head": "attention-fusion"}, False, "--head attention-fusion"),
    ({"strategy": "linear", "limit_per_class": 10, "few_shot": "off"}, False, "--few-shot off"),
    ({"strategy": "linear", "few_shot": "on"}, True, "--few-shot on"),
])
def test_the_rule_names_its_verdict(overrides: dict[str, object], active: bool, reason: str) -> None:
    cfg = TrainConfig(**overrides)  # type: ignore[arg-type]
    cfg.validate()
    choice = cfg.few_shot_choice()
    assert choice.active is active and cfg.few_shot_active is active
    assert reason in choice.reason


def test_the_default_full_data_job_does_not_use_it() -> None:
    assert not TrainConfig().few_shot_active


@pytest.mark.parametrize(("overrides", "message"), [
    ({"strategy": "lp-ft", "few_shot": "on"}, "--few-shot on is a linear probe"),
    ({"strategy": "linear", "few_shot_views": 8}, "--few-shot-views does nothing without the few-shot recipe"),
    ({"strategy": "linear", "limit_per_class": 10, "probe_epochs": 5}, "--probe-epochs does nothing"),
    ({"strategy": "linear", "limit_per_class": 10, "balance": "sampler"}, "--balance sampler does nothing"),
    ({"strategy": "linear", "limit_per_class": 10, "few_shot_views": 1}, "--few-shot-views"),
    ({"few_shot": "maybe"}, "Invalid --few-shot 'maybe'"),
])
def test_options_it_cannot_use_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(TlDeployError, match=message):
        TrainConfig(**overrides).validate()  # type: ignore[arg-type]


def test_the_run_records_the_rule_and_the_head(few_shot_artifact: Path) -> None:
    config = json.loads((few_shot_artifact / "config.json").read_text())
    training = config["training"]
    assert training["few_shot"] == "auto" and training["few_shot_used"] is True
    assert "--limit-per-class 5 <= 20" in training["few_shot_reason"]
    assert config["architecture"]["head"] == MULTI_LEVEL_HEAD and config["architecture"]["flip_tta"] is True
    metrics = json.loads((few_shot_artifact / "metrics.json").read_text())
    assert metrics["history"][0]["steps"] == 30
    assert metrics["test_acc"] > 1 / len(TINY_CLASSES)  # separable shapes: a trained head beats chance
    assert isinstance(load_artifact(few_shot_artifact).model, MultiLevelClassifier)


def test_a_plain_probe_records_the_rule_off(tiny_data: Path, tmp_path: Path) -> None:
    path = fit(few_shot_config(tiny_data, tmp_path / "plain", few_shot="off", few_shot_views=64,
                               few_shot_steps=2000, probe_epochs=2))
    config = json.loads((path / "config.json").read_text())
    assert config["training"]["few_shot_used"] is False and config["architecture"]["head"] == "linear"


# ----------------------------------------------------------------------------- the network

def test_flip_tta_averages_the_image_and_its_mirror_image() -> None:
    torch.manual_seed(0)
    model = create_multi_level_model(TINY_MODEL, 3, weights="none", levels=3).eval()
    x = torch.randn(4, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        expected = (model.pooled_levels(x) + model.pooled_levels(x.flip(3))) / 2
        assert torch.allclose(pooled_features(model, x), expected, atol=1e-6)
        assert torch.allclose(model(x), model.head(expected), atol=1e-6)
        assert torch.allclose(model(x), model(x.flip(3)), atol=1e-5)  # mirror-invariant by construction
        assert not torch.allclose(model.pooled_levels(x), model.pooled_levels(x.flip(3)), atol=1e-3)


def test_levels_are_the_last_blocks_and_the_final_features() -> None:
    torch.manual_seed(0)
    plain = create_model(TINY_MODEL, num_classes=3, weights="none").eval()
    model = create_multi_level_model(TINY_MODEL, 3, weights="none", levels=3, flip_tta=False).eval()
    model.backbone.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("classifier")})
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        feats = model.pooled_levels(x)
        final = pooled_features(plain, x)
    assert feats.shape == (2, model.num_features) and len(model.level_dims) == 3
    assert model.level_dims[-1] == final.shape[1]
    assert torch.allclose(feats[:, -final.shape[1]:], final, atol=1e-5)  # the last level is timm's own features


# ----------------------------------------------------------------------------- the cached views

def test_views_are_the_image_its_mirror_image_and_seeded_augmentations(tiny_data: Path) -> None:
    torch.manual_seed(0)
    model = create_multi_level_model(TINY_MODEL, 3, weights="none", levels=2, flip_tta=False).eval()
    samples = load_splits(tiny_data).val[:6]
    spec = PreprocessSpec.for_size(TINY_SIZE)
    cpu = torch.device("cpu")
    views = compute_view_features(model.pooled_levels, model, samples, spec, views=4, seed=3, device=cpu)
    assert views.shape == (6, 4, model.num_features)
    clean = compute_features(model, samples, spec, device=cpu, forward=model.pooled_levels)
    mirror = model.pooled_levels(torch.stack([mirror_transform(spec)(p) for p, _ in samples]))
    assert torch.allclose(views[:, 0], clean, atol=1e-5)
    assert torch.allclose(views[:, 1], mirror.detach(), atol=1e-5)
    assert not torch.allclose(views[:, 2], views[:, 0], atol=1e-3)  # random flips + affine transforms
    again = compute_view_features(model.pooled_levels, model, samples, spec, views=4, seed=3, device=cpu)
    other = compute_view_features(model.pooled_levels, model, samples, spec, views=4, seed=4, device=cpu)
    assert torch.equal(again, views)  # seeded: the cache entry is reproducible
    assert not torch.allclose(other[:, 2:], views[:, 2:], atol=1e-3)
    assert torch.allclose(other[:, :2], views[:, :2], atol=1e-6)


def test_mirror_transform_mirrors_the_eval_image(tiny_data: Path) -> None:
    spec = PreprocessSpec.for_size(TINY_SIZE)
    path = load_splits(tiny_data).train[0][0]
    assert torch.equal(mirror_transform(spec)(path), eval_transform(spec)(path).flip(2))


# ----------------------------------------------------------------------------- export

def test_the_few_shot_artifact_exports_and_its_onnx_matches_pytorch(few_shot_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    rows = export_artifact(few_shot_artifact, out, ExportOptions(simplify=False))  # export-time parity check inside
    assert rows[0].status == "ok"
    artifact = load_artifact(few_shot_artifact)
    x = np.random.default_rng(1).standard_normal((5, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    with torch.inference_mode():
        expected = artifact.model(torch.from_numpy(x)).numpy()
        mirrored = artifact.model(torch.from_numpy(x[..., ::-1].copy())).numpy()
    session = ort.InferenceSession(str(out / rows[0].file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    assert got.shape == (5, len(TINY_CLASSES))
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - mirrored).max() <= 1e-4  # the flip TTA is in the exported graph
