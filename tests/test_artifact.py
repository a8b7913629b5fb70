from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_deploy.artifact import load_artifact
from tl_deploy.errors import ArtifactError


def test_round_trip_gives_identical_logits(tiny_artifact: Path, tiny_data: Path) -> None:
    a = load_artifact(tiny_artifact)
    b = load_artifact(tiny_artifact)
    image = next((tiny_data / "test" / "circle").iterdir())
    x = a.transform()(image).unsqueeze(0)
    with torch.no_grad():
        la, lb = a.model(x), b.model(x)
    assert torch.equal(la, lb)
    assert a.class_names == ["circle", "square", "bar"]
    assert a.spec.input_size == 32
    assert len(a.checksum) == 64


def test_tampered_weights_are_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="was modified"):
        load_artifact(copy)
    load_artifact(copy, verify=False)  # deliberate override still loads


def test_missing_folder_and_non_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="config.json is missing"):
        load_artifact(tmp_path)


def test_preprocess_matches_saved_spec(tiny_artifact: Path) -> None:
    a = load_artifact(tiny_artifact)
    x = a.transform()(np.zeros((10, 20), dtype=np.uint8))
    assert tuple(x.shape) == (3, 32, 32)
