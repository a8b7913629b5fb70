"""Bounded decoding: a few hundred bytes never become gigabytes, and one bad image in a batch
never costs the others their results."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CLASSES, TINY_MODEL, TINY_SIZE, draw_shape
from tl_deploy.data import load_splits
from tl_deploy.errors import DataError
from tl_deploy.preprocess import MAX_ASPECT_RATIO, PreprocessSpec, prepare, prepare_uint8
from tl_deploy.runtime import load
from tl_deploy.uploads import ImageItem, classify_items

SPEC = PreprocessSpec(input_size=TINY_SIZE, resize=TINY_SIZE)


def strip_png(path: Path, width: int) -> Path:
    """A 1-pixel-high PNG: ``width`` 200000 is a few hundred bytes, 22 million pixels once resized to 112."""
    Image.new("L", (width, 1), 255).save(path, optimize=True)
    return path


@pytest.fixture(scope="module")
def strips(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("strips")
    return {w: strip_png(root / f"strip-{w}.png", w) for w in (20_000, 200_000)}


def test_the_strips_are_tiny_files(strips: dict[int, Path]) -> None:
    assert strips[200_000].stat().st_size < 2_000 and strips[20_000].stat().st_size < 500


@pytest.mark.parametrize("width", [20_000, 200_000])
@pytest.mark.parametrize("convert", [prepare, prepare_uint8])
def test_elongated_images_are_refused_before_the_resize(width: int, convert, strips: dict[int, Path]) -> None:  # type: ignore[no-untyped-def]
    spec = PreprocessSpec(input_size=112, resize=128)
    for source in (strips[width], strips[width].read_bytes(), Image.open(strips[width]),
                   np.zeros((1, width, 3), dtype=np.uint8)):
        with pytest.raises(DataError, match=rf"too elongated: .* is {width}x1, an aspect ratio of {width}:1, above "
                                            rf"the {MAX_ASPECT_RATIO}:1 limit"):
            convert(source, spec)


def test_aspect_ratio_limit_is_inclusive() -> None:
    ok = np.zeros((2, 2 * MAX_ASPECT_RATIO, 3), dtype=np.uint8)
    assert prepare(ok, SPEC).shape == (3, TINY_SIZE, TINY_SIZE)
    with pytest.raises(DataError, match="too elongated"):
        prepare(np.zeros((2, 2 * MAX_ASPECT_RATIO + 1, 3), dtype=np.uint8), SPEC)
    with pytest.raises(DataError, match=r"is 1x200000, an aspect ratio of 200000:1"):  # upright: 1 wide
        prepare(np.zeros((200_000, 1, 3), dtype=np.uint8), SPEC)


def test_pixel_count_after_the_resize_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    image = np.zeros((40, 1000, 3), dtype=np.uint8)  # 40,000 pixels, 25:1: fine before the resize
    assert prepare(image, SPEC).shape == (3, TINY_SIZE, TINY_SIZE)  # 32 x 800 once resized
    with pytest.raises(DataError, match=r"too large once resized: <ndarray> \(1000x40\) would become 6400x256 = "
                                        r"1638400 pixels at resize=256, above the 1000000-pixel limit"):
        prepare(image, PreprocessSpec(input_size=224, resize=256))


def test_runtime_batch_returns_per_image_errors(app_export: Path, tiny_data: Path, strips: dict[int, Path]) -> None:
    clf = load(app_export, precision="fp32")
    good = sorted((tiny_data / "test" / "circle").glob("*.png"))[:2]
    results = clf.predict_each([good[0], strips[200_000], good[1], strips[20_000]], top_k=2)
    assert [type(r).__name__ for r in results] == ["Prediction", "DataError", "Prediction", "DataError"]
    expected = clf.predict(good, top_k=2)
    for got, i in ((results[0], 0), (results[2], 1)):
        assert not isinstance(got, DataError)
        assert got.labels == [expected.labels[i]]
        np.testing.assert_allclose(got.probabilities, expected.probabilities[i:i + 1], rtol=1e-6)
    assert str(strips[200_000]) in str(results[1]) and "too elongated" in str(results[1])
    with pytest.raises(DataError, match="too elongated"):  # predict() still raises: one clear error
        clf.predict([good[0], strips[20_000]])


def test_app_batch_keeps_the_good_results(app_export: Path, tiny_data: Path, strips: dict[int, Path]) -> None:
    clf = load(app_export, precision="fp32")
    good = sorted((tiny_data / "test" / "square").glob("*.png"))[:3]
    items = [ImageItem(p.name, p.read_bytes(), "square") for p in good]
    items.insert(1, ImageItem("strip.png", strips[20_000].read_bytes(), "square"))
    items.append(ImageItem("long.png", strips[200_000].read_bytes(), "square"))
    result = classify_items(clf, items)
    assert result.errors == 2 and result.labelled == 3
    bad = [r for r in result.rows if r["error"]]
    assert [r["image"] for r in bad] == ["strip.png", "long.png"] and all("too elongated" in r["error"] for r in bad)
    labels, _ = clf.predict(good)
    assert [r["prediction"] for r in result.rows if not r["error"]] == [lab[0] for lab in labels]


def _data_with(strip: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for name in TINY_CLASSES:
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                draw_shape(name, rng).save(data / split / name / f"{i}.png")
    shutil.copy(strip, data / "train" / "bar" / "strip.png")
    return data


def test_training_flags_the_strip(strips: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.finetune import main

    data = _data_with(strips[20_000], tmp_path)
    out = tmp_path / "run"
    rc = main(["--data", str(data), "--model", TINY_MODEL, "--weights", "none", "--img-size", str(TINY_SIZE),
               "--epochs", "1", "--workers", "0", "--on-bad-image", "fail", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and len(errors) == 1 and "strip.png" in errors[0] and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(DataError, match=r"1 bad file\(s\) .*strip.png \(Image too elongated\)"):
        load_splits(data)
    assert [b.path.name for b in load_splits(data, on_bad_image="skip").skipped] == ["strip.png"]


def test_a_normal_photo_shape_still_loads() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 1000), (10, 20, 30)).save(buf, format="PNG")  # a 4:1 panorama
    assert prepare(buf.getvalue(), SPEC).shape == (3, TINY_SIZE, TINY_SIZE)
