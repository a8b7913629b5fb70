"""Domain adaptation: the losses on tiny tensors, and a short end-to-end DA run that exports."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tl_deploy.artifact import load_artifact
from tl_deploy.errors import DataError
from tl_deploy.export import ExportOptions, export_artifact
from tl_deploy.finetune import main
from tl_deploy.train.adaptation import (
    DomainAdapter,
    coral,
    cycle,
    dann_coefficient,
    grad_reverse,
    mk_mmd,
    unlabeled_samples,
)
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.recipe import fit

from .conftest import TINY_MODEL, TINY_SIZE, make_image_folder
from .test_finetune import assert_one_error_line


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x, 0.5) * torch.arange(3.0)).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))
    assert torch.equal(grad_reverse(x, 0.5), x)  # identity forward


def test_dann_schedule_ramps_from_zero_to_one() -> None:
    assert dann_coefficient(0.0) == 0.0
    assert 0.98 < dann_coefficient(1.0) < 1.0
    assert dann_coefficient(0.1) < dann_coefficient(0.5)


def test_mmd_near_zero_for_same_distribution_and_grows_with_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 8, generator=g), torch.randn(128, 8, generator=g)
    same = float(mk_mmd(a, b))
    shifts = [float(mk_mmd(a, b + shift)) for shift in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.02
    assert same < shifts[0] < shifts[1] < shifts[2]
    assert shifts[0] > 5 * abs(same)


def test_coral_zero_for_equal_covariance_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 5, generator=g)
    assert float(coral(a, a + 3.0)) == pytest.approx(0.0, abs=1e-7)  # a mean shift keeps the covariance
    assert float(coral(a, 2.0 * a)) > 0.01


def test_losses_refuse_single_sample_batches() -> None:
    with pytest.raises(DataError, match="at least 2"):
        mk_mmd(torch.randn(1, 3), torch.randn(4, 3))
    with pytest.raises(DataError, match="at least 2"):
        coral(torch.randn(4, 3), torch.randn(1, 3))


class _TinyNet(torch.nn.Module):
    """timm's interface in miniature: forward_features, forward_head(pre_logits), get_classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.fc = torch.nn.Linear(4, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean((2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def get_classifier(self) -> torch.nn.Module:
        return self.fc


def test_dann_adapter_reverses_the_domain_gradient_into_the_backbone() -> None:
    torch.manual_seed(0)
    net = _TinyNet()
    source, target = torch.randn(6, 3, 4, 4), torch.randn(5, 3, 4, 4) + 1.0
    adapter = DomainAdapter("dann", 4, 1.0, iter([target]), total_steps=10).eval()  # eval: no dropout
    adapter.steps_done = 10
    logits, loss = adapter(net, source)
    assert logits.shape == (6, 3)
    loss.backward()
    reversed_grad = net.conv.weight.grad.clone()  # type: ignore[union-attr]
    disc = adapter.discriminator
    assert disc is not None
    disc_grad = disc.net[0].weight.grad.clone()  # type: ignore[union-attr]

    net.zero_grad()
    disc.zero_grad()
    feats = torch.cat([net.forward_head(net.forward_features(x), pre_logits=True) for x in (source, target)])
    is_source = torch.cat([torch.ones(6), torch.zeros(5)])
    torch.nn.functional.binary_cross_entropy_with_logits(disc(feats), is_source).backward()
    coeff = dann_coefficient(1.0)
    assert torch.allclose(reversed_grad, -coeff * net.conv.weight.grad, atol=1e-6)  # type: ignore[operator]
    assert torch.allclose(disc_grad, disc.net[0].weight.grad, atol=1e-6)  # type: ignore[arg-type,union-attr]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("target"), {"train": 8, "test": 4}, seed=7)


def da_config(data: Path, target: Path, out: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(data=str(data), model=TINY_MODEL, weights="none", img_size=TINY_SIZE,
                       crop_pct=1.0, interpolation="bilinear", strategy="finetune",
                       epochs=1, batch_size=8, lr=1e-2, augment=False, out=str(out), no_cache=True, workers=0,
                       target_unlabeled=str(target), da="dann", amp="off", device="cpu")
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["dann", "mmd", "coral"])
def test_da_run_writes_a_normal_artifact_that_exports(tiny_data: Path, target_dir: Path, tmp_path: Path,
                                                      method: str) -> None:
    path = fit(da_config(tiny_data, target_dir, tmp_path / "run", da=method))
    metrics = json.loads((path / "metrics.json").read_text())
    assert 0.0 <= metrics["target_test_acc"] <= 1.0 and metrics["splits"]["target_test"]["count"] == 12
    assert "no target labels" in metrics["model_selection"]
    assert metrics["history"][-1]["align_loss"] == pytest.approx(metrics["history"][-1]["align_loss"])  # finite
    config = json.loads((path / "config.json").read_text())
    assert config["training"]["da"] == method and config["architecture"]["head"] == "linear"
    artifact = load_artifact(path)
    assert not any("discriminator" in k for k in artifact.model.state_dict())
    if method == "dann":
        rows = export_artifact(path, tmp_path / "export", ExportOptions(simplify=False))
        assert rows[0].status == "ok" and (tmp_path / "export" / rows[0].file).is_file()


def test_unlabeled_samples_reads_train_or_flat_folder(target_dir: Path, tmp_path: Path) -> None:
    assert len(unlabeled_samples(target_dir)) == 24 and {lbl for _, lbl in unlabeled_samples(target_dir)} == {-1}
    with pytest.raises(DataError, match="is not a folder"):
        unlabeled_samples(tmp_path / "missing")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(3.0), torch.zeros(3)),
                                         batch_size=2)
    stream = cycle(loader)
    assert [len(next(stream)) for _ in range(4)] == [2, 1, 2, 1]


@pytest.mark.parametrize("args, message", [
    (["--da", "dann"], "--da dann needs --target-unlabeled DIR"),
    (["--da", "mmd", "--target-unlabeled", "T", "--strategy", "linear"], "--strategy linear keeps frozen"),
])
def test_cli_refuses_bad_da_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                    message: str) -> None:
    code = main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), *args])
    assert code != 0
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "o").exists()
