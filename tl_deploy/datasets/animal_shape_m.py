"""Animal-Shape-M: Animal-Shape silhouettes blended with colour photographs, a domain-shift benchmark.

Built the way the DANN paper built MNIST-M from MNIST: each 28x28 silhouette is combined with a random
28x28 patch of a real colour photograph by the per-channel absolute difference
``out = |patch - silhouette|`` (the background shows the photo, the animal shows its negative). The
photographs are the colour photos shipped inside scikit-image (``skimage.data``: no download), the
patches are drawn with a fixed seed, and the train/val/test split is Animal-Shape's own (same seed,
same fractions, same file names), so source and target images correspond one to one.

    tl-deploy datasets animal-shape-m --out data/animal-shape-m

Needs scikit-image: ``pip install 'tl_deploy[datasets]'``.
"""

from __future__ import annotations

import hashlib
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

# Colour photographs bundled with scikit-image (not fetched on demand); drawings and logos left out.
PHOTOS: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
)
BLEND_SEED = 20160526  # patch choice; fixed so every build is identical


def load_photos(names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """The (H, W, 3) uint8 photographs, read from scikit-image's bundled data."""
    try:
        import skimage
        import skimage.data
    except ImportError as exc:
        raise DataError(
            "animal-shape-m needs scikit-image for its bundled photographs: pip install 'tl_deploy[datasets]' "
            "(or pip install scikit-image)"
        ) from exc
    photos = []
    for name in names:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # a missing or download-only image in this scikit-image version
            raise DataError(
                f"scikit-image {getattr(skimage, '__version__', '?')} cannot provide the photo {name!r} offline "
                f"({exc}); install scikit-image>=0.22"
            ) from exc
        if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
            raise DataError(f"skimage.data.{name} is {image.shape} {image.dtype}, expected an RGB uint8 photo")
        photos.append(np.ascontiguousarray(image[:, :, :3]))
    return photos


def blend_with_photos(silhouettes: np.ndarray, photos: list[np.ndarray], seed: int = BLEND_SEED) -> np.ndarray:
    """(N, H, W) uint8 silhouettes -> (N, H, W, 3) uint8: ``|random photo patch - silhouette|``."""
    if silhouettes.ndim != 3 or silhouettes.dtype != np.uint8:
        raise DataError(f"silhouettes must be (N, H, W) uint8, got {silhouettes.shape} {silhouettes.dtype}")
    n, h, w = silhouettes.shape
    rng = np.random.default_rng(seed)
    which = [int(k) for k in rng.integers(0, len(photos), size=(n,))]
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[which[i]]
        top = int(rng.integers(0, photo.shape[0] - h + 1))
        left = int(rng.integers(0, photo.shape[1] - w + 1))
        patch = photo[top:top + h, left:left + w].astype(np.int16)  # (H, W, 3)
        out[i] = np.abs(patch - silhouettes[i].astype(np.int16)[:, :, None]).astype(np.uint8)
    return out


def _photos_sha256(photos: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for photo in photos:
        digest.update(f"{photo.shape}".encode())
        digest.update(photo.tobytes())
    return digest.hexdigest()


def prepare_animal_shape_m(
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    wheel: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Write Animal-Shape-M at ``out`` with Animal-Shape's split (``seed`` and fractions as for animal-shape)."""
    out = Path(out)
    source = {**animal_shape_source(), "photos": list(PHOTOS), "blend_seed": BLEND_SEED, "blend": "abs-diff"}
    if tree_is_current(out, source, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, force=force):
        return out
    photos = load_photos()  # before the wheel, so a missing scikit-image fails fast
    images, labels = load_animal_shape_arrays(obtain_wheel(wheel, cache_dir))  # (N, 28, 28), (N,)
    blended = blend_with_photos(images, photos)  # (N, 28, 28, 3)
    import skimage

    info = {
        "name": "animal-shape-m",
        "description": "Animal-Shape silhouettes blended (|patch - silhouette|) with scikit-image colour photos",
        "license": "MIT (silhouettes); photographs: see scikit-image's data/README",
        "source": source,
        "photos_sha256": _photos_sha256(photos),
        "scikit_image": getattr(skimage, "__version__", "unknown"),
    }
    return write_image_folder(blended, labels, ANIMAL_SHAPE_CLASSES, out, seed=seed, val_fraction=val_fraction,
                              test_fraction=test_fraction, info=info, force=True)
