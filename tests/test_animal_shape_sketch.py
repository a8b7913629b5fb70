"""Animal-Shape-Sketch: pencil outlines on paper, seeded, with Animal-Shape's split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_deploy.datasets import DATASETS, read_dataset_info, write_image_folder
from tl_deploy.datasets import animal_shape_sketch as sketch_module
from tl_deploy.datasets.animal_shape_sketch import outline, prepare_animal_shape_sketch, sketch
from tl_deploy.errors import DataError


def _square(n: int = 4) -> np.ndarray:
    sil = np.zeros((n, 28, 28), np.uint8)
    sil[:, 8:20, 8:20] = 255
    return sil


def test_outline_is_the_contour_not_the_fill() -> None:
    line = outline(_square(1)[0], width=4)  # 1 px at 28x28
    assert line.shape == (112, 112)
    assert line[32:36, 40].all() and not line[56, 56] and not line[0, 0]  # edge drawn, inside and outside empty
    assert line.sum() == 48 * 48 - 40 * 40


def test_sketch_is_dark_lines_on_light_paper_and_seeded() -> None:
    out = sketch(_square())
    assert out.shape == (4, 28, 28, 3) and out.dtype == np.uint8
    gray = out.mean(axis=3)  # (4, 28, 28)
    assert (gray[:, 14, 14] > 150).all() and (gray[:, 2, 2] > 150).all()  # paper inside and outside the shape
    assert (gray[:, 8, 14] < gray[:, 14, 14] - 50).all()  # the contour is darker
    assert np.array_equal(out, sketch(_square()))
    assert not np.array_equal(out, sketch(_square(), seed=1))
    with pytest.raises(DataError, match="silhouettes must be"):
        sketch(np.zeros((2, 28, 28, 3), np.uint8))


def test_prepare_keeps_animal_shape_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.repeat(np.arange(10, dtype=np.int64), 10)
    images = _square(100)
    monkeypatch.setattr(sketch_module, "obtain_wheel", lambda wheel, cache_dir: Path("unused"))
    monkeypatch.setattr(sketch_module, "load_animal_shape_arrays", lambda path: (images, labels))
    source = write_image_folder(images, labels, [f"c{i}" for i in range(10)], tmp_path / "src")
    out = prepare_animal_shape_sketch(tmp_path / "s")
    names = lambda root: sorted(p.relative_to(root).parts[0] + "/" + p.name for p in root.rglob("*.png"))  # noqa: E731
    assert names(out) == names(source)
    img = np.asarray(Image.open(next((out / "train").rglob("*.png"))))
    assert img.shape == (28, 28, 3)
    info = read_dataset_info(out)
    assert info is not None and info["image_mode"] == "RGB" and info["name"] == "animal-shape-sketch"
    assert "animal-shape-sketch" in DATASETS
    assert prepare_animal_shape_sketch(tmp_path / "s") == out  # up to date: not rewritten
