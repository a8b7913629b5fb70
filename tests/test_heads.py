"""Attention-fusion head: shapes, attention weights, stage grouping, artifact round trip, ONNX parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tl_deploy.artifact import Architecture, load_artifact, save_artifact
from tl_deploy.backbones import backbone_stages, pooled_features, set_trainable
from tl_deploy.errors import ModelError
from tl_deploy.export import ExportOptions, export_artifact
from tl_deploy.heads import AttentionFusionHead, FusionClassifier, create_fusion_model
from tl_deploy.preprocess import PreprocessSpec

from .conftest import TINY_CLASSES, TINY_MODEL, TINY_SIZE


@pytest.fixture(scope="module")
def fusion_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    arch = Architecture(name=TINY_MODEL, num_classes=len(TINY_CLASSES), head="attention-fusion", drop_rate=0.0,
                        fusion_levels=3, fusion_dim=32, channel_attention=True)
    model = create_fusion_model(TINY_MODEL, arch.num_classes, weights="none", drop_rate=0.0, levels=3, dim=32)
    with torch.no_grad():  # a non-trivial head and BN statistics, so parity is really exercised
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("fusion") / "model"
    return save_artifact(out, model.eval(), architecture=arch, class_names=TINY_CLASSES,
                         spec=PreprocessSpec(input_size=TINY_SIZE, resize=TINY_SIZE), training={}, metrics={})


def test_head_mixes_levels_with_weights_that_sum_to_one() -> None:
    torch.manual_seed(0)
    head = AttentionFusionHead([4, 6, 8], num_classes=5, dim=16).eval()
    x = torch.randn(7, 18)
    assert head(x).shape == (7, 5)
    weights = head.level_weights(x)
    assert weights.shape == (7, 3)
    assert torch.allclose(weights.sum(1), torch.ones(7), atol=1e-6)
    assert (weights.std(0) > 0).any()  # per-image attention, not a constant


def test_model_exposes_pooled_levels_and_stage_groups() -> None:
    model = create_fusion_model(TINY_MODEL, 3, weights="none", levels=3, dim=16).eval()
    assert isinstance(model, FusionClassifier)
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    feats = pooled_features(model, x)
    assert feats.shape == (2, sum(model.level_dims)) and len(model.level_dims) == 3
    assert torch.allclose(model.get_classifier()(feats), model(x), atol=1e-6)
    stages = backbone_stages(model)
    assert stages and all(name.startswith("backbone.") for stage in stages for name in stage)
    set_trainable(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(stages[-1]) <= trainable and not set(stages[0]) & trainable
    assert {n for n, _ in model.head.named_parameters(prefix="head")} <= trainable


def test_bad_level_count_is_refused() -> None:
    with pytest.raises(ModelError, match="Invalid --fusion-levels 1"):
        create_fusion_model(TINY_MODEL, 3, weights="none", levels=1)


def test_artifact_records_and_rebuilds_the_head(fusion_artifact: Path) -> None:
    config = json.loads((fusion_artifact / "config.json").read_text())
    assert config["architecture"]["head"] == "attention-fusion"
    assert config["architecture"]["fusion_levels"] == 3 and config["architecture"]["fusion_dim"] == 32
    loaded = load_artifact(fusion_artifact)
    assert isinstance(loaded.model, FusionClassifier)
    assert loaded.architecture.channel_attention


def test_fusion_head_exports_to_onnx_with_parity(fusion_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    rows = export_artifact(fusion_artifact, out, ExportOptions(simplify=False))  # export-time parity check inside
    assert rows[0].status == "ok"
    artifact = load_artifact(fusion_artifact)
    x = np.random.default_rng(1).standard_normal((5, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    with torch.inference_mode():
        expected = artifact.model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(out / rows[0].file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    assert got.shape == (5, len(TINY_CLASSES))
    assert np.abs(got - expected).max() <= 1e-4
