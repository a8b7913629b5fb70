from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tl_deploy.artifact import load_artifact
from tl_deploy.finetune import main
from tl_deploy.train import finetuning, stage_cache
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.recipe import fit
from tl_deploy.train.stage_cache import FrozenForward

from .conftest import TINY_MODEL, TINY_SIZE, make_image_folder


def assert_one_error_line(stderr: str, message: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr


def tiny_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(data=str(data), model=TINY_MODEL, weights="none", img_size=TINY_SIZE,
                       crop_pct=1.0, interpolation="bilinear", strategy="finetune",
                       epochs=4, probe_epochs=3, batch_size=8, lr=1e-2, backbone_lr_mult=1.0, augment=False,
                       warmup_epochs=0.5, out=str(out), no_cache=True, workers=0,
                       amp="off", device="cpu")  # pinned: the same arithmetic on every CPU, also on a GPU machine
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(tiny_config(tiny_data, tmp_path_factory.mktemp("ft") / "run"))


def test_loss_decreases_and_accuracy_beats_chance(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    history = [h for h in metrics["history"] if h["phase"] == "finetune"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["test_acc"] > 0.6  # chance is 1/3
    assert len(metrics["splits"]["test"]["confusion_matrix"]) == 3
    assert sum(metrics["phase_seconds"].values()) == pytest.approx(metrics["train_seconds"], abs=0.2)


def test_artifact_is_self_describing(trained: Path) -> None:
    config = json.loads((trained / "config.json").read_text())
    assert config["class_names"] == ["bar", "circle", "square"]
    assert config["preprocess"]["input_size"] == TINY_SIZE
    assert config["architecture"]["name"] == TINY_MODEL
    assert {"torch", "timm", "tl_deploy"} <= set(config["versions"])
    for name in ("model.safetensors", "metrics.json", "curves.png", "confusion.png", "manifest.json"):
        assert (trained / name).is_file(), name
    assert not (trained.parent / f".{trained.name}.checkpoint").exists()


def test_artifact_reproduces_recorded_accuracy(trained: Path, tiny_data: Path) -> None:
    from tl_deploy.evaluate import evaluate_artifact

    metrics = json.loads((trained / "metrics.json").read_text())
    result = evaluate_artifact(load_artifact(trained), tiny_data, "test")
    assert result.accuracy == pytest.approx(metrics["test_acc"])


def test_linear_probe_runs_the_backbone_once(tiny_data: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = stage_cache.frozen_forward

    def counting_frozen_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        forward = real(*args, **kwargs)

        def counted(x: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1  # one backbone pass over a batch
            return forward(x)

        return FrozenForward(counted, forward.runtime)

    monkeypatch.setattr(stage_cache, "frozen_forward", counting_frozen_forward)
    cfg = tiny_config(tiny_data, tmp_path / "lin", strategy="linear", probe_epochs=5, no_cache=False,
                      cache_dir=str(tmp_path / "cache"))
    fit(cfg)
    first = calls["n"]
    assert first == 2  # one batch of train features, one of val: not once per epoch
    fit(replace(cfg, out=str(tmp_path / "lin2")))
    assert calls["n"] == first  # second run: all features from the cache
    a = load_artifact(tmp_path / "lin")
    b = load_artifact(tmp_path / "lin2")
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)


def test_lp_ft_and_partial_run(tiny_data: Path, tmp_path: Path) -> None:
    for strategy in ("lp-ft", "partial"):
        path = fit(tiny_config(tiny_data, tmp_path / strategy, strategy=strategy, epochs=1, unfreeze=1))
        metrics = json.loads((path / "metrics.json").read_text())
        phases = {h["phase"] for h in metrics["history"]}
        assert phases == ({"probe", "finetune"} if strategy == "lp-ft" else {"finetune"})


def test_frozen_stage_cache_matches_running_every_layer(tiny_data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # PyTorch runs the frozen passes too, so both paths do the same arithmetic (onnxruntime's outputs
    # match to float rounding: tests/test_frozen.py).
    cfg = tiny_config(tiny_data, tmp_path / "cached", strategy="lp-ft", epochs=2, unfreeze=2, deterministic=True,
                      cache_runtime="torch")
    cached = fit(cfg)
    monkeypatch.setattr(stage_cache, "ACTIVATION_CACHE_MAX_BYTES", 0)  # forces the every-layer path
    full = fit(replace(cfg, out=str(tmp_path / "full")))
    training = [json.loads((p / "config.json").read_text())["training"] for p in (cached, full)]
    assert [t["frozen_stage_cache"] for t in training] == [True, False]
    assert training[0]["stages_trained"] == 2
    a, b = load_artifact(cached).model.state_dict(), load_artifact(full).model.state_dict()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-4, atol=1e-5, msg=key)
    stem = next(iter(a))
    assert torch.equal(a[stem], load_artifact(cached).model.state_dict()[stem])


def test_frozen_passes_on_onnxruntime_train_the_same_model(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "torch", strategy="lp-ft", epochs=2, unfreeze=2, deterministic=True,
                      cache_runtime="torch")
    runs = [fit(cfg), fit(replace(cfg, out=str(tmp_path / "ort"), cache_runtime="onnxruntime"))]
    training = [json.loads((p / "config.json").read_text())["training"] for p in runs]
    assert [t["cache_runtime_used"] for t in training] == ["torch", "onnxruntime"]
    assert all(t["frozen_stage_cache"] for t in training)
    metrics = [json.loads((p / "metrics.json").read_text()) for p in runs]
    history = [[h["val_loss"] for h in m["history"]] for m in metrics]
    torch.testing.assert_close(history[1], history[0], rtol=1e-3, atol=1e-4)  # same training, float rounding apart
    assert metrics[1]["test_acc"] == metrics[0]["test_acc"]


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "full", epochs=2, deterministic=True)
    full = load_artifact(fit(cfg)).model.state_dict()

    real_epoch = finetuning.train_one_epoch
    seen = {"n": 0}

    def crash_on_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["n"] += 1
        if seen["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(finetuning, "train_one_epoch", crash_on_second)
    crashed = replace(cfg, out=str(tmp_path / "crashed"))
    with pytest.raises(KeyboardInterrupt):
        fit(crashed)
    assert not (tmp_path / "crashed").exists()  # no half-written artifact
    monkeypatch.setattr(finetuning, "train_one_epoch", real_epoch)
    resumed = load_artifact(fit(replace(crashed, resume=True))).model.state_dict()
    for key, value in full.items():
        assert torch.equal(value, resumed[key]), key


def _bad_layouts(root: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (root / "does-not-exist", "Data folder not found")
    empty = root / "no_classes"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    cases["no_classes"] = (empty, "No class folders")
    ec = make_image_folder(root / "empty_class", {"train": 2, "val": 1})
    shutil.rmtree(ec / "train" / "bar")
    (ec / "train" / "bar").mkdir()
    cases["empty_class"] = (ec, "has no images")
    extra = make_image_folder(root / "val_only_class", {"train": 2, "val": 1})
    shutil.copytree(extra / "val" / "bar", extra / "val" / "zebra")
    cases["val_only_class"] = (extra, "not in the training split")
    text = make_image_folder(root / "non_image", {"train": 2, "val": 1})
    (text / "train" / "bar" / "notes.txt").write_text("hello")
    cases["non_image"] = (text, "not an image file type")
    corrupt = make_image_folder(root / "corrupt", {"train": 2, "val": 1})
    (corrupt / "train" / "bar" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    cases["corrupt"] = (corrupt, "1 bad file(s)")
    return cases


@pytest.mark.parametrize("case", ["missing", "no_classes", "empty_class", "val_only_class", "non_image", "corrupt"])
def test_bad_data_gives_one_clear_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, message = _bad_layouts(tmp_path)[case]
    out = tmp_path / "out"
    rc = main(["--data", str(data), "--model", TINY_MODEL, "--weights", "none", "--out", str(out)])
    assert rc != 0
    assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--model", "efficientnet_lite9"], "Unknown model name"),
    (["--model", "test_resnet", "--weights", "embedded"], "No embedded weights"),
    (["--strategy", "lp-ft", "--probe-epochs", "0"], "needs --probe-epochs"),
    (["--unfreeze", "99"], "Invalid --unfreeze 99"),  # refused before the probe runs, not after
    (["--unfreeze", "some"], "Invalid --unfreeze"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_bad_options_give_one_clear_line(args: list[str], message: str, tiny_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--data", str(tiny_data), "--model", TINY_MODEL, "--weights", "none", "--out", str(tmp_path / "o")]
    rc = main(base + args)
    assert rc != 0
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.checkpoint").exists()


def test_weights_that_do_not_fit_cli(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from tl_deploy.backbones import create_model

    other = create_model("test_resnet", num_classes=3, weights="none")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    rc = main(["--data", str(tiny_data), "--model", TINY_MODEL, "--weights", str(path), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, "do not fit")
