"""ImageFolder trees: ``OUT/{train,val,test}/<class>/<index>.png`` plus ``OUT/dataset.json``.

``write_image_folder`` splits labelled arrays per class (stratified, seeded) and writes the tree
atomically. ``dataset.json`` records what the tree is a function of (the data's identity, the seed,
the fractions, the class names), so a re-run with the same key is a no-op and a run with other
options can say what it would replace (``split_differences``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from tl_deploy.errors import DataError
from tl_deploy.fileio import atomic_dir, atomic_write_json, check_output_folder, read_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1  # bump when the layout of the tree or of dataset.json changes



def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_val = round(n * val_fraction)
    n_test = round(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(
                f"--{name}-fraction must be between 0 and 1 (exclusive), got {value}; pass e.g. "
                f"--{name}-fraction {0.1 if name == 'val' else 0.2}"
            )
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val + test fractions must leave images for training, got {val_fraction} + "
            f"{test_fraction} >= 1; lower --val-fraction or --test-fraction"
        )


def _check_arrays(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if not (images.ndim == 3 or rgb) or images.dtype != np.uint8:
        raise DataError(
            f"images must be (N, H, W) uint8 grayscale or (N, H, W, 3) uint8 RGB, got {images.shape} "
            f"{images.dtype}; convert them before writing"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels must be ({images.shape[0]},) integers to match the images, got "
            f"{labels.shape} {labels.dtype}; pass one integer label per image"
        )
    if len(set(class_names)) != len(class_names):
        raise DataError(f"class names must be unique, got {list(class_names)}; rename duplicates")
    for name in class_names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise DataError(f"class name {name!r} cannot be a folder name; rename it")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"labels span {labels.min()}..{labels.max()} but there are {len(class_names)} class "
            f"names; pass one name per label value 0..{len(class_names) - 1}"
        )


def _stratified_split(
    labels: np.ndarray, n_classes: int, seed: int, val_fraction: float, test_fraction: float,
    class_names: Sequence[str],
) -> dict[str, list[np.ndarray]]:
    """Per split, per class: the source indices (sorted) that go there."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in range(n_classes):
        idx = rng.permutation(np.flatnonzero(labels == label))  # (n_c,)
        n_train, n_val, n_test = _split_counts(len(idx), val_fraction, test_fraction)
        if min(n_train, n_val, n_test) < 1:
            raise DataError(
                f"class {class_names[label]!r} has {len(idx)} images, too few to split "
                f"{1 - val_fraction - test_fraction:.2f}/{val_fraction}/{test_fraction} with at "
                "least one image per split; change the fractions or add images"
            )
        parts = (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])
        for split, part in zip(SPLITS, parts):
            splits[split].append(np.sort(part))
    return splits


def _count_pngs(out: Path, class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts[split] = {}
        for name in class_names:
            folder = out / split / name
            if folder.is_dir():
                with os.scandir(folder) as entries:
                    counts[split][name] = sum(1 for e in entries if e.name.endswith(".png"))
            else:
                counts[split][name] = 0
    return counts


def read_dataset_info(out: Path) -> dict[str, Any] | None:
    """The ``dataset.json`` of a tree written here, or None if it is missing or unreadable."""
    path = Path(out) / DATASET_JSON
    try:
        info = read_json(path)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def split_differences(out: Path, name: str, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """How the tree at ``out`` differs from dataset ``name`` split with these options ([] if it does not
    differ or holds no tree written here): what a rebuild with these options would silently replace."""
    info = read_dataset_info(out)
    if info is None:
        return []
    wanted = {"name": name, "seed": seed, "fractions": _fraction_record(val_fraction, test_fraction)}
    return [f"{key} {info.get(key)!r} instead of {value!r}" for key, value in wanted.items() if info.get(key) != value]


def _is_current(out: Path, expected: Mapping[str, Any]) -> bool:
    """True if ``out`` holds a complete tree whose dataset.json records the ``expected`` values."""
    info = read_dataset_info(out)
    if info is None:
        return False
    for key, value in expected.items():
        if info.get(key) != value:
            logger.info("%s is stale: %s was %r, now %r", out, key, info.get(key), value)
            return False
    classes = info.get("classes")
    if not isinstance(classes, list) or _count_pngs(out, classes) != info.get("counts"):
        logger.info("%s is incomplete: file counts differ from %s", out, DATASET_JSON)
        return False
    return True


def tree_key(identity: Mapping[str, Any], seed: int, val_fraction: float, test_fraction: float,
              class_names: Sequence[str]) -> dict[str, Any]:
    """What a written tree is a function of: the data (``identity``), the split and the class names."""
    return {"format_version": FORMAT_VERSION, **identity, "seed": seed,
            "fractions": _fraction_record(val_fraction, test_fraction), "classes": list(class_names)}


def up_to_date(out: Path, key: Mapping[str, Any], *, force: bool, force_hint: str) -> bool:
    """True when ``out`` already holds the tree ``key`` describes (nothing to do); otherwise refuses an
    ``out`` that tl_deploy did not write, before anything is built."""
    if not force and _is_current(out, key):
        logger.info("%s is already up to date; nothing to do (pass %s to rebuild)", out, force_hint)
        return True
    _refuse_foreign_folder(out)
    return False


def _refuse_foreign_folder(out: Path) -> None:
    # atomic_dir replaces whatever is at ``out``; never let that be a folder we did not write.
    check_output_folder(out, "dataset")


def _fraction_record(val_fraction: float, test_fraction: float) -> dict[str, float]:
    return {
        "train": round(1.0 - val_fraction - test_fraction, 10),
        "val": val_fraction,
        "test": test_fraction,
    }


def _arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (images, labels.astype(np.int64)):
        digest.update(f"{array.shape}{array.dtype.str}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write_image_folder(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    info: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``out/{train,val,test}/<class>/<index>.png`` and ``out/dataset.json`` atomically.

    The split is stratified: each class is permuted with ``numpy.random.default_rng(seed)`` and
    cut into train/val/test. ``info`` adds fields (name, source, license...) to dataset.json. If
    ``out`` already holds the same data split the same way, nothing is written unless ``force``.
    """
    out = Path(out)
    check_fractions(val_fraction, test_fraction)
    _check_arrays(images, labels, class_names)
    key = tree_key({"data_sha256": _arrays_sha256(images, labels)}, seed, val_fraction, test_fraction, class_names)
    if up_to_date(out, key, force=force, force_hint="force"):
        return out

    splits = _stratified_split(
        labels, len(class_names), seed, val_fraction, test_fraction, class_names
    )
    width = len(str(max(len(labels) - 1, 0)))
    counts = {
        split: {name: len(part) for name, part in zip(class_names, parts)}
        for split, parts in splits.items()
    }
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        with tqdm(total=len(labels), desc=f"writing {out.name}", unit="img", disable=None) as bar:
            for split, parts in splits.items():
                for name, part in zip(class_names, parts):
                    folder = tmp / split / name
                    folder.mkdir(parents=True)
                    for index in part:
                        Image.fromarray(images[index]).save(folder / f"{index:0{width}d}.png")
                    bar.update(len(part))
        record = {
            **dict(info or {}),
            **key,
            "image_size": [int(images.shape[1]), int(images.shape[2])],
            "image_mode": "RGB" if images.ndim == 4 else "L",
            "counts": counts,
            "total": len(labels),
        }
        atomic_write_json(tmp / DATASET_JSON, record)
    logger.info("wrote %d images to %s in %.1fs", len(labels), out, time.perf_counter() - start)
    return out
