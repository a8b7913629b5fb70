"""Loading checks the model, not only the files: manifests that list too little, non-finite weights,
ONNX graphs whose inputs, outputs or class list disagree with their metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, TINY_SIZE
from tl_deploy.artifact import load_artifact, save_artifact
from tl_deploy.errors import ArtifactError
from tl_deploy.fileio import sha256_file


def _one_error_line(stderr: str, message: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr


def _rewrite_weights(model: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    edit(state)
    save_file(state, str(model / "model.safetensors"))


def _reseal(model: Path) -> None:
    """Record the current checksums in manifest.json, as a careful tamperer would."""
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"] = {n: sha256_file(model / n) for n in manifest["files"]}
    (model / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- item 4: manifests, weights


def test_empty_manifest_next_to_modified_weights_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_artifact, model)

    def tamper_head(state: dict[str, torch.Tensor]) -> None:
        state["classifier.bias"] = state["classifier.bias"] + torch.tensor([10.0, 0.0, 0.0])

    _rewrite_weights(model, tamper_head)
    (model / "manifest.json").write_text(json.dumps({"format": "tl_deploy.model", "files": {}}))
    with pytest.raises(ArtifactError, match=r"lists no checksum for model.safetensors, config.json, metrics.json"):
        load_artifact(model)
    partial = {"format": "tl_deploy.model", "files": {"config.json": sha256_file(model / "config.json")}}
    (model / "manifest.json").write_text(json.dumps(partial))
    with pytest.raises(ArtifactError, match=r"no checksum for model.safetensors, metrics.json"):
        load_artifact(model)
    assert load_artifact(model, verify=False).model.classifier.bias[0] > 5  # deliberately, it still loads


def test_non_finite_weights_are_refused_at_save(tiny_artifact: Path, tmp_path: Path) -> None:
    art = load_artifact(tiny_artifact)
    with torch.no_grad():
        art.model.classifier.weight[1, 2] = float("nan")
    out = tmp_path / "models" / "nan"
    with pytest.raises(ArtifactError, match=r"1 weight tensor\(s\) hold NaN or infinity \(classifier.weight\)"):
        save_artifact(out, art.model, architecture=art.architecture, class_names=art.class_names, spec=art.spec,
                      training={}, metrics={})
    assert not (tmp_path / "models").exists()  # nothing written, not even a temp folder


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(value: float, tiny_artifact: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_artifact, model)

    def poison(state: dict[str, torch.Tensor]) -> None:
        state["classifier.weight"][0, 0] = value

    _rewrite_weights(model, poison)
    _reseal(model)  # checksums match: only the values betray it
    for verify in (True, False):
        with pytest.raises(ArtifactError, match=r"Refusing .*model.safetensors: 1 weight tensor\(s\) hold NaN"):
            load_artifact(model, verify=verify)


@pytest.mark.parametrize("strategy", ["linear", "lp-ft"])
def test_diverged_training_ends_with_one_line_and_writes_nothing(strategy: str, tiny_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.finetune import main

    out = tmp_path / "run"
    rc = main(["--data", str(tiny_data), "--model", TINY_MODEL, "--weights", "none", "--img-size", str(TINY_SIZE),
               "--strategy", strategy, "--epochs", "1", "--probe-epochs", "1", "--batch-size", "16",
               "--no-augment", "--no-cache", "--workers", "0", "--weight-decay", "inf", "--out", str(out)])
    assert rc != 0
    _one_error_line(capsys.readouterr().err, "hold NaN or infinity")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no artifact, no checkpoint, no temp folder
