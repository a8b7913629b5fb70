"""Animal-Shape-Sketch: the silhouettes redrawn as pencil outlines on paper, a second domain-shift benchmark.

Different in kind from Animal-Shape-M (photo textures blended into the filled shape): here the shape
is not filled at all. Each 28x28 silhouette becomes its contour, a line one or two pixels wide (drawn
at 4x resolution and box-filtered down, so it is anti-aliased), in a dark pencil colour on a light,
slightly tinted paper with grain and a soft lighting gradient, and a few stray strokes. The polarity
is the opposite of the source (dark figure on light ground) and the texture is line art, not a mask.
Everything is drawn with numpy from a fixed seed: no download, no extra dependency. The train/val/test
split is Animal-Shape's own (same seed, same fractions, same file names).

    tl-deploy datasets animal-shape-sketch --out data/animal-shape-sketch
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tl_deploy.datasets.animal_shape import (
    ANIMAL_SHAPE_CLASSES,
    animal_shape_source,
    load_animal_shape_arrays,
    obtain_wheel,
    tree_is_current,
)
from tl_deploy.datasets.imagefolder import write_image_folder
from tl_deploy.errors import DataError

SKETCH_SEED = 20240917  # line widths, colours, paper, strokes; fixed so every build is identical
UPSCALE = 4  # the outline is drawn at 4x and box-filtered down to 28x28


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion of an (H, W) bool mask (outside the image counts as background)."""
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


def _dilate(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary dilation of an (H, W) bool mask."""
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
            | padded[1:-1, :-2] | padded[1:-1, 2:])


def outline(silhouette: np.ndarray, width: int) -> np.ndarray:
    """(H, W) uint8 silhouette -> (H*UPSCALE, W*UPSCALE) bool contour about ``width`` hi-res pixels wide."""
    big = np.kron(silhouette > 127, np.ones((UPSCALE, UPSCALE), dtype=bool))
    inner = big
    for _ in range(width):
        inner = _erode(inner)
    return big & ~inner


def _stroke(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """One short straight stray pencil stroke on an (h, w) bool canvas, in place."""
    h, w = canvas.shape
    y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3) * h
    t = np.linspace(0.0, 1.0, int(length) * 2 + 2)
    ys = np.clip((y0 + t * length * np.sin(angle)).astype(int), 0, h - 1)
    xs = np.clip((x0 + t * length * np.cos(angle)).astype(int), 0, w - 1)
    canvas[ys, xs] = True


def sketch(silhouettes: np.ndarray, seed: int = SKETCH_SEED) -> np.ndarray:
    """(N, H, W) uint8 silhouettes -> (N, H, W, 3) uint8 pencil outlines on paper."""
    if silhouettes.ndim != 3 or silhouettes.dtype != np.uint8:
        raise DataError(f"silhouettes must be (N, H, W) uint8, got {silhouettes.shape} {silhouettes.dtype}")
    n, h, w = silhouettes.shape
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)  # (H, W) each, for the lighting gradient
    for i in range(n):
        lines = outline(silhouettes[i], width=int(rng.integers(3, 8)))  # 0.75-1.75 px at 28x28
        for _ in range(int(rng.integers(0, 3))):
            _stroke(lines, rng)
        lines = _dilate(lines) if rng.random() < 0.2 else lines
        coverage = lines.reshape(h, UPSCALE, w, UPSCALE).mean(axis=(1, 3))  # (H, W) in [0, 1], anti-aliased
        coverage *= rng.uniform(0.7, 1.0)  # pencil pressure
        paper = rng.uniform(200, 250) + rng.uniform(-12, 12, size=3)  # (3,) a tinted white
        gx, gy = rng.uniform(-25, 25, size=2)
        ground = (paper[None, None, :] + (gx * xx + gy * yy)[:, :, None]
                  + rng.normal(0, 6, size=(h, w, 1)))  # (H, W, 3) paper with lighting and grain
        ink = rng.uniform(15, 90) + rng.uniform(-15, 15, size=3)  # (3,) graphite to dark blue-grey
        image = ground * (1 - coverage[:, :, None]) + ink[None, None, :] * coverage[:, :, None]
        out[i] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out


def prepare_animal_shape_sketch(
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    wheel: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Write Animal-Shape-Sketch at ``out`` with Animal-Shape's split (``seed`` and fractions as for animal-shape)."""
    out = Path(out)
    source = {**animal_shape_source(), "sketch_seed": SKETCH_SEED, "style": "pencil-outline-v1"}
    if tree_is_current(out, source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, force=force):
        return out
    images, labels = load_animal_shape_arrays(obtain_wheel(wheel, cache_dir))  # (N, 28, 28), (N,)
    info = {
        "name": "animal-shape-sketch",
        "description": "Animal-Shape silhouettes redrawn as anti-aliased pencil outlines on tinted paper",
        "license": "MIT (silhouettes)",
        "source": source,
    }
    return write_image_folder(sketch(images), labels, ANIMAL_SHAPE_CLASSES, out, seed=seed,
                              val_fraction=val_fraction, test_fraction=test_fraction, info=info, force=True)
