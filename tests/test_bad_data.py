"""Messy datasets: every kind of bad file is either refused up front (naming it) or skipped and listed;
every PIL mode becomes the model's RGB input through one function, the same in every consumer."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_deploy.data import eval_transform, find_bad_images, load_splits, train_transform
from tl_deploy.errors import DataError
from tl_deploy.export.quantize import calibration_batches
from tl_deploy.finetune import main
from tl_deploy.preprocess import PreprocessSpec, open_image, prepare, to_rgb
from tl_deploy.train.recipe import fit

from .conftest import TINY_MODEL, TINY_SIZE, make_image_folder
from .test_finetune import assert_one_error_line, tiny_config

ODD_CLASS = "sq uare é"  # spaces and non-ASCII in a class name


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height``, with a tiny IDAT: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def image_in_mode(mode: str, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A deterministic test image in ``mode`` with a transparent / extreme corner where it applies."""
    rng = np.random.default_rng(sum(map(ord, mode)))
    w, h = size
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode == "I;16":
        arr = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        arr[0, 0], arr[0, 1] = 0, 65535
        return Image.frombytes("I;16", (w, h), arr.astype("<u2").tobytes())
    if mode == "F":
        return Image.frombytes("F", (w, h), rng.uniform(-3.0, 5.0, (h, w)).astype("<f4").tobytes())
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 8, (h, w)).astype(np.uint8), mode="P")
        img.putpalette([v for i in range(256) for v in (i * 30 % 256, i * 70 % 256, i * 110 % 256)])
        img.info["transparency"] = 0
        return img
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (h, w, bands)).astype(np.uint8)
    if mode in ("LA", "RGBA"):
        arr[: h // 2, :, -1] = 0  # top half fully transparent
        arr[h // 2:, :, -1] = 255
    return Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode=mode)


SAVE_FORMAT = {"1": "png", "L": "png", "LA": "png", "P": "png", "RGB": "png", "RGBA": "png", "CMYK": "tiff",
               "I;16": "png", "F": "tiff"}


@pytest.mark.parametrize("mode", list(SAVE_FORMAT))
def test_every_mode_converts_the_same_way_everywhere(mode: str, tmp_path: Path) -> None:
    img = image_in_mode(mode)
    path = tmp_path / f"img.{SAVE_FORMAT[mode]}"
    img.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really holds this mode
    rgb = np.asarray(to_rgb(img, (10, 20, 30)))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8

    # The expected colours, mode by mode.
    if mode in ("1", "L"):
        assert np.array_equal(rgb[..., 0], np.asarray(img.convert("L"))) and np.all(rgb == rgb[..., :1])
    elif mode in ("LA", "RGBA"):
        assert np.all(rgb[:15] == (10, 20, 30))  # transparent half shows the background
        opaque = np.asarray(img.convert("RGBA"))[15:, :, :3]
        assert np.array_equal(rgb[15:], opaque)
    elif mode == "P":
        transparent = np.asarray(img) == 0
        assert transparent.any() and np.all(rgb[transparent] == (10, 20, 30))
        assert np.array_equal(rgb[~transparent], np.asarray(img.convert("RGB"))[~transparent])
    elif mode == "I;16":
        assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, 1]) == (255, 255, 255)
        expected = (np.asarray(img, dtype=np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
        assert np.array_equal(rgb[..., 1], expected)
    elif mode == "F":
        arr = np.asarray(img)
        assert tuple(rgb[np.unravel_index(arr.argmin(), arr.shape)]) == (0, 0, 0)
        assert tuple(rgb[np.unravel_index(arr.argmax(), arr.shape)]) == (255, 255, 255)
    else:
        assert np.array_equal(rgb, np.asarray(img.convert("RGB")))

    # One conversion: file, bytes and in-memory image agree, and so do training (eval and
    # un-augmented train transforms), export calibration and the runtime's preprocessing.
    spec = PreprocessSpec(input_size=16, resize=16, background=(10, 20, 30))
    reference = prepare(img, spec)
    assert np.array_equal(prepare(path, spec), reference)
    assert np.array_equal(prepare(path.read_bytes(), spec), reference)
    assert np.array_equal(eval_transform(spec)(path).numpy(), reference)
    assert np.array_equal(train_transform(spec, augment=False)(path).numpy(), reference)
    assert np.array_equal(next(calibration_batches([path], spec))[0], reference)


def test_runtime_uses_the_same_conversion(tiny_artifact: Path, tmp_path: Path) -> None:
    from tl_deploy.runtime import load

    clf = load(tiny_artifact)
    for mode, ext in SAVE_FORMAT.items():
        path = tmp_path / f"{mode.replace(';', '_')}.{ext}"
        image_in_mode(mode).save(path)
        assert np.array_equal(clf.preprocess([path])[0], prepare(path, clf.spec)), mode


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (40, 20, 3)  # portrait after rotation
    assert rgb[:15].mean() > 200 and rgb[25:].mean() < 50  # white half now on top


def build_messy_folder(root: Path) -> tuple[Path, list[str]]:
    """A small ImageFolder with every kind of trouble; returns it and the files that must be reported."""
    make_image_folder(root, {"train": 8, "val": 3})
    for split in ("train", "val"):
        os.rename(root / split / "square", root / split / ODD_CLASS)
    train = root / "train"
    bad: list[str] = []

    def add_bad(rel: str, data: bytes) -> None:
        (train / rel).write_bytes(data)
        bad.append(rel)

    good_png = (train / "bar" / "000.png").read_bytes()
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)  # mostly entropy-coded data after the header
    good_jpg = buf.getvalue()
    add_bad("bar/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    add_bad("bar/truncated.png", good_png[: len(good_png) // 2])
    add_bad("circle/truncated.jpg", good_jpg[: len(good_jpg) * 2 // 3])
    add_bad("circle/zero.png", b"")
    add_bad("circle/notes.txt", b"not an image")
    add_bad(f"{ODD_CLASS}/text named ünïcode.jpg", b"hello, I am text")
    add_bad(f"{ODD_CLASS}/bomb.png", png_header_only(20_000, 20_000))  # > 2x PIL's limit: PIL refuses
    add_bad("bar/big.png", png_header_only(10_000, 10_000))  # between 1x and 2x: PIL only warns
    os.symlink("self-loop.png", train / "bar" / "self-loop.png")
    bad.append("bar/self-loop.png")
    os.symlink("..", train / "circle" / "loop")  # folder loop: not followed
    (train / "bar" / ".DS_Store").write_bytes(b"\0\1junk")  # hidden: ignored
    (train / "bar" / ".ipynb_checkpoints").mkdir()
    (train / "bar" / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    # Good files in the other modes, saved as real files: none of them may be reported.
    for i, (mode, ext) in enumerate(SAVE_FORMAT.items()):
        image_in_mode(mode).save(train / "circle" / f"mode_{i}.{ext}")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(train / "bar" / "exif.jpg", exif=exif)
    return root, bad


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return build_messy_folder(tmp_path_factory.mktemp("messy"))


def test_fail_mode_names_every_bad_file_at_once(messy: tuple[Path, list[str]]) -> None:
    root, bad = messy
    with pytest.raises(DataError) as info:
        load_splits(root)
    message = str(info.value)
    assert message.startswith(f"{len(bad)} bad file(s) in {root}")
    for rel in bad:
        assert str(root / "train" / rel) in message, rel
    assert "--on-bad-image skip" in message
    assert ".DS_Store" not in message and "ipynb" not in message and "mode_" not in message


def test_fail_mode_cli_one_line_nothing_written(messy: tuple[Path, list[str]], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root, bad = messy
    out = tmp_path / "out"
    rc = main(["--data", str(root), "--model", TINY_MODEL, "--weights", "none", "--out", str(out)])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, f"{len(bad)} bad file(s)")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_skip_mode_trains_and_lists_what_it_skipped(messy: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, bad = messy
    splits = load_splits(root, on_bad_image="skip")
    assert sorted(b.path for b in splits.skipped) == sorted(root / "train" / rel for rel in bad)
    assert ODD_CLASS in splits.class_names
    good = 3 * 8 + len(SAVE_FORMAT) + 1  # generated shapes + one file per mode + the EXIF jpeg
    assert len(splits.train) == good and len(splits.val) == 9
    path = fit(tiny_config(root, tmp_path / "run", on_bad_image="skip", epochs=1))
    config = json.loads((path / "config.json").read_text())
    assert config["class_names"] == sorted(["bar", "circle", ODD_CLASS])
    assert config["training"]["train_images"] == good
    assert len(config["training"]["skipped_images"]) == len(bad)


def test_truncated_file_is_found(messy: tuple[Path, list[str]]) -> None:
    root, _ = messy
    truncated = root / "train" / "circle" / "truncated.jpg"
    with Image.open(truncated) as img:
        assert img.size == (64, 64)  # the header is intact: only decoding the data finds the cut
    [found] = find_bad_images([(truncated, 0)])
    assert found.path == truncated and "truncated" in found.reason


def test_val_split_drops_bad_files_before_splitting(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "flat", {"all": 6}) / "all"
    (root / "bar" / "broken.png").write_bytes(b"\x89PNG broken")
    splits = load_splits(root, val_fraction=0.3, on_bad_image="skip")
    used = {p for p, _ in splits.train + splits.val}
    assert len(splits.skipped) == 1 and splits.skipped[0].path not in used and len(used) == 18


def test_skip_that_empties_a_class_is_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"train": 2, "val": 1})
    for p in (root / "train" / "bar").iterdir():
        p.write_bytes(b"")
    with pytest.raises(DataError, match=r"Classes \['bar'\] have no training images"):
        load_splits(root, on_bad_image="skip")


def test_invalid_on_bad_image_value(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match="Invalid --on-bad-image 'ignore'"):
        load_splits(tiny_data, on_bad_image="ignore")
    with pytest.raises(SystemExit) as exc:  # argparse refuses values outside the choices
        main(["--data", str(tiny_data), "--model", TINY_MODEL, "--img-size", str(TINY_SIZE),
              "--on-bad-image", "ignore", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "invalid choice: 'ignore'" in capsys.readouterr().err
