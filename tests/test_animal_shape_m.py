"""Animal-Shape-M: the MNIST-M style blend, the split it keeps, and the missing-dependency error."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_deploy.datasets import DATASETS, animal_shape_m, main, read_dataset_info
from tl_deploy.datasets.animal_shape_m import blend_with_photos, load_photos, prepare_animal_shape_m
from tl_deploy.errors import DataError


def test_blend_is_abs_difference_with_a_photo_patch() -> None:
    photo = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    sil = np.zeros((3, 8, 8), np.uint8)
    sil[:, 2:6, 2:6] = 255
    out = blend_with_photos(sil, [photo], seed=1)
    assert out.shape == (3, 8, 8, 3) and out.dtype == np.uint8
    for img in out:  # background: the photo; inside the silhouette: its negative
        patch = img.copy()
        patch[2:6, 2:6] = 255 - img[2:6, 2:6]
        found = any(np.array_equal(photo[t:t + 8, s:s + 8], patch) for t in range(33) for s in range(43))
        assert found
    assert np.array_equal(out, blend_with_photos(sil, [photo], seed=1))  # seeded
    assert not np.array_equal(out, blend_with_photos(sil, [photo], seed=2))


def test_bundled_photos_load_offline() -> None:
    pytest.importorskip("skimage")
    photos = load_photos()
    assert len(photos) == len(animal_shape_m.PHOTOS)
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 and min(p.shape[:2]) >= 28 for p in photos)


def test_prepare_keeps_animal_shape_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.repeat(np.arange(10, dtype=np.int64), 10)  # 10 classes x 10
    images = np.zeros((100, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    photo = np.full((60, 60, 3), 40, np.uint8)
    monkeypatch.setattr(animal_shape_m, "obtain_wheel", lambda wheel, cache_dir: Path("unused"))
    monkeypatch.setattr(animal_shape_m, "load_animal_shape_arrays", lambda path: (images, labels))
    monkeypatch.setattr(animal_shape_m, "load_photos", lambda: [photo])
    from tl_deploy.datasets import write_image_folder

    source = write_image_folder(images, labels, [f"c{i}" for i in range(10)], tmp_path / "src")
    out = prepare_animal_shape_m(tmp_path / "m")
    names = lambda root: sorted(p.relative_to(root).parts[0] + "/" + p.name for p in root.rglob("*.png"))  # noqa: E731
    assert names(out) == names(source)  # same split, same files
    img = np.asarray(Image.open(next((out / "train").rglob("*.png"))))
    assert img.shape == (28, 28, 3) and img[0, 0, 0] == 40 and img[12, 12, 0] == 255 - 40
    info = read_dataset_info(out)
    assert info is not None and info["image_mode"] == "RGB" and info["name"] == "animal-shape-m"


def test_missing_scikit_image_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    real_import = builtins.__import__

    def no_skimage(name: str, *args: object, **kwargs: object) -> object:
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError("No module named 'skimage'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    assert main(["animal-shape-m", "--out", str(tmp_path / "m")]) != 0
    err = capsys.readouterr().err
    assert "pip install 'tl_deploy[datasets]'" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    assert "animal-shape-m" in DATASETS


def test_rgb_arrays_must_have_three_channels(tmp_path: Path) -> None:
    from tl_deploy.datasets import write_image_folder

    with pytest.raises(DataError, match="images must be"):
        write_image_folder(np.zeros((30, 8, 8, 4), np.uint8), np.repeat(np.arange(3), 10), ["a", "b", "c"],
                           tmp_path / "x")
