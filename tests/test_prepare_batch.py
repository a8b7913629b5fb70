"""preprocess.prepare_batch (predict's decoding) is prepare, bit for bit, on every kind of image."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tl_deploy.errors import DataError
from tl_deploy.predict import decode_batch, decoded_batches
from tl_deploy.preprocess import (
    PreprocessSpec,
    normalize,
    normalize_batch,
    prepare,
    prepare_batch,
    resize_and_crop,
    to_rgb,
)

ORIENTATION = 0x0112
XMP_ROTATED = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
               '</x:xmpmeta>')


def reference(source: Path, spec: PreprocessSpec) -> np.ndarray:
    """prepare as it was written first: PIL's own exif_transpose (in to_rgb), an RGB resize, a PIL crop,
    the lookup-table normalisation."""
    with Image.open(source) as img:
        img.load()
        rgb = to_rgb(img, spec.background)
    return normalize(np.asarray(resize_and_crop(rgb, spec), dtype=np.uint8), spec)


def _rotated_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif.tobytes()


def _gradient(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.arange(height) * 7, np.arange(width) * 3) % 256  # structure a rotation changes
    noise = rng.integers(0, 40, (height, width, channels))
    return np.clip(base[:, :, None] + noise, 0, 255).astype(np.uint8)


def write_images(root: Path) -> dict[str, Path]:
    """One file per kind of input predict meets: every PIL mode to_rgb converts, odd sizes, EXIF and XMP
    orientations in PNG, JPEG, WebP and TIFF."""
    rgb = _gradient(37, 23, 3, 0)
    grey = _gradient(28, 28, 1, 1)[:, :, 0]
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kwargs: object) -> None:
        files[name] = root / name
        image.save(files[name], **kwargs)

    save("grey.png", Image.fromarray(grey, mode="L"))
    save("grey-odd.png", Image.fromarray(_gradient(31, 200, 1, 2)[:, :, 0], mode="L"))
    save("grey-large.png", Image.fromarray(_gradient(300, 260, 1, 3)[:, :, 0], mode="L"))
    save("rgb-odd.png", Image.fromarray(rgb, mode="RGB"))
    save("rgb-wide.bmp", Image.fromarray(_gradient(401, 150, 3, 4), mode="RGB"))
    save("grey-as-rgb.png", Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB"))
    rgba = np.concatenate([rgb, _gradient(37, 23, 1, 5)], axis=2)
    save("rgba.png", Image.fromarray(rgba, mode="RGBA"))
    save("la.png", Image.fromarray(rgba[:, :, [0, 3]], mode="LA"))
    save("palette.png", Image.fromarray(rgb, mode="RGB").quantize(16))
    save("palette-transparent.png", Image.fromarray(rgb, mode="RGB").quantize(16), transparency=3)
    save("grey-transparent.png", Image.fromarray(grey, mode="L"), transparency=0)
    save("bilevel.png", Image.fromarray(grey, mode="L").convert("1"))
    save("grey16.png", Image.fromarray(grey.astype(np.uint16) * 251))
    save("int32.tif", Image.fromarray(grey.astype(np.int32) * 1000 - 5000))
    save("float.tif", Image.fromarray(grey.astype(np.float32) / 7.0))
    save("cmyk.jpg", Image.fromarray(rgb, mode="RGB").convert("CMYK"), quality=95)
    save("rgb-exif6.jpg", Image.fromarray(rgb, mode="RGB"), exif=_rotated_exif(6), quality=95)
    save("grey-exif3.jpg", Image.fromarray(grey, mode="L"), exif=_rotated_exif(3), quality=95)
    save("grey-exif8.png", Image.fromarray(grey, mode="L"), exif=_rotated_exif(8))
    save("rgb-exif5.webp", Image.fromarray(rgb, mode="RGB"), exif=_rotated_exif(5), lossless=True)
    save("rgb-exif7.tif", Image.fromarray(rgb, mode="RGB"), tiffinfo={ORIENTATION: 7})
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", XMP_ROTATED)
    save("grey-xmp6.png", Image.fromarray(_gradient(30, 26, 1, 6)[:, :, 0], mode="L"), pnginfo=xmp)
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_images(tmp_path_factory.mktemp("kinds"))


SPECS = {
    "default": PreprocessSpec(),
    "crop-bgr-bicubic": dataclasses.replace(PreprocessSpec.for_size(32, 0.8), channel_order="BGR",
                                            interpolation="bicubic", background=(255, 128, 0)),
    "lanczos": PreprocessSpec(input_size=64, resize=64, interpolation="lanczos", mean=(0.5, 0.5, 0.5),
                              std=(0.25, 0.5, 1.0)),
}


@pytest.mark.parametrize("spec_name", SPECS)
def test_prepare_batch_is_prepare_bit_for_bit(images: dict[str, Path], spec_name: str) -> None:
    spec = SPECS[spec_name]
    paths = list(images.values())
    batch, errors = prepare_batch(paths, spec)
    assert errors == {} and batch is not None
    assert batch.shape == (len(paths), 3, spec.input_size, spec.input_size) and batch.dtype == np.float32
    assert batch.flags.c_contiguous
    for path, got in zip(paths, batch):
        want = reference(path, spec)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), path.name  # every bit
        assert np.array_equal(prepare(path, spec).view(np.uint32), want.view(np.uint32)), path.name


def test_the_orientations_are_applied(images: dict[str, Path]) -> None:
    """The EXIF and XMP files really are rotated (or the equality above could not catch a skipped rotation).
    Not the TIFF: PIL turns a TIFF upright while loading it."""
    spec = SPECS["default"]
    for name in ("rgb-exif6.jpg", "grey-exif3.jpg", "grey-exif8.png", "rgb-exif5.webp", "grey-xmp6.png"):
        with Image.open(images[name]) as img:
            img.load()
            upright = normalize(np.asarray(resize_and_crop(img.convert("RGB"), spec)), spec)
        assert not np.array_equal(prepare_batch([images[name]], spec)[0][0], upright), name


def test_other_inputs_and_bad_files(images: dict[str, Path], tmp_path: Path) -> None:
    """Bytes, PIL images and arrays as prepare takes them; unreadable files get prepare's own error, in place."""
    spec = SPECS["crop-bgr-bicubic"]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    with Image.open(images["rgb-exif6.jpg"]) as img:
        img.load()
        pil = img.copy()
    sources: list[object] = [images["grey.png"].read_bytes(), tmp_path / "missing.png", pil, tmp_path / "empty.png",
                             _gradient(20, 30, 3, 7), tmp_path, _gradient(20, 30, 1, 8)[:, :, 0],
                             tmp_path / "text.png", str(images["rgba.png"])]
    batch, errors = prepare_batch(sources, spec)  # type: ignore[arg-type]
    bad = [1, 3, 5, 7]
    assert sorted(errors) == bad
    for i in bad:
        with pytest.raises(DataError) as info:
            prepare(sources[i], spec)  # type: ignore[arg-type]
        assert str(errors[i]) == str(info.value)
    assert batch is not None and len(batch) == len(sources) - len(bad)
    want = np.stack([prepare(s, spec) for i, s in enumerate(sources) if i not in bad])  # type: ignore[arg-type]
    assert np.array_equal(batch.view(np.uint32), want.view(np.uint32))
    none, only = prepare_batch([tmp_path / "missing.png"], spec)
    assert none is None and list(only) == [0] and str(only[0]) == str(errors[1])


def test_normalize_batch_equals_the_table_on_every_level() -> None:
    """All 256 levels in every channel, grey and colour, RGB and BGR, written into a caller's array."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    colour = np.stack([levels, levels[::-1], levels.T], axis=2)  # (16, 16, 3)
    for order in ("RGB", "BGR"):
        spec = dataclasses.replace(PreprocessSpec.for_size(16), channel_order=order, mean=(0.1, 0.7, 0.33),
                                   std=(0.3, 0.11, 0.9))
        want = np.stack([normalize(np.repeat(levels[:, :, None], 3, axis=2), spec), normalize(colour, spec)])
        assert np.array_equal(normalize_batch([levels, colour], spec).view(np.uint32), want.view(np.uint32))
        out = np.full((4, 3, 16, 16), np.nan, dtype=np.float32)
        got = normalize_batch([levels, colour], spec, out)
        assert np.shares_memory(got, out) and got.shape == (2, 3, 16, 16)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    with pytest.raises(DataError, match="need a C-contiguous float32 array"):
        normalize_batch([levels], spec, np.empty((1, 3, 16, 16), dtype=np.float64))
    with pytest.raises(DataError, match="need a C-contiguous float32 array"):
        normalize_batch([levels, levels], spec, np.empty((1, 3, 16, 16), dtype=np.float32))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_decoded_batches_reuse_their_arrays_and_give_the_same_images(images: dict[str, Path],
                                                                      workers: int) -> None:
    spec = SPECS["default"]
    paths = list(images.values()) * 3
    want = [decode_batch(paths[i:i + 4], spec).images for i in range(0, len(paths), 4)]
    bases: set[int] = set()
    count = 0
    for batch, expected in zip(decoded_batches(paths, spec, 4, workers, reuse=True), want, strict=True):
        assert batch.images is not None and expected is not None
        assert np.array_equal(batch.images.view(np.uint32), expected.view(np.uint32))
        base = batch.images.base if batch.images.base is not None else batch.images
        bases.add(id(base))
        count += 1
    assert count == len(want)
    assert len(bases) <= (1 if workers == 0 else max(2, workers) + 2) < count  # a few arrays, written over
    fresh = [b.images for b in decoded_batches(paths, spec, 4, workers)]  # without reuse: every batch its own
    assert all(not np.shares_memory(a, b) for i, a in enumerate(fresh) for b in fresh[i + 1:])
