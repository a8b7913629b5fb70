"""ImageFolder loading, splits, and transforms built from a ``PreprocessSpec``."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image

from tl_deploy.errors import DataError
from tl_deploy.preprocess import (
    IMAGE_EXTENSIONS,
    ImageInput,
    PreprocessSpec,
    check_image_size,
    load_and_resize,
    normalize,
    prepare,
    to_rgb,
)

_logger = logging.getLogger(__name__)

Sample = tuple[Path, int]
Transform = Callable[[ImageInput], torch.Tensor]
ON_BAD_IMAGE = ("fail", "skip")
_SHOWN_BAD = 10  # offending files named in an error message; the rest are logged


@dataclass(frozen=True)
class BadFile:
    """A file in the data folder that cannot be a training image, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


@dataclass(frozen=True)
class Splits:
    """Labelled samples per split; ``test`` may be empty."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[BadFile] = field(default_factory=list)  # bad files left out by --on-bad-image skip

    def get(self, split: str) -> list[Sample]:
        if split not in ("train", "val", "test"):
            raise DataError(f"Invalid split {split!r}. Only train, val and test exist.")
        return list(getattr(self, split))


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def find_classes(root: Path) -> list[str]:
    """Sorted class folder names under ``root``."""
    if not root.is_dir():
        raise DataError(f"Data folder not found: {root}. Pass --data pointing at an ImageFolder tree.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    if not classes:
        raise DataError(
            f"No class folders in {root}: expected {root}/<class_name>/<image files>."
        )
    return classes


def scan_split(root: Path, class_names: Sequence[str] | None = None,
               bad: list[BadFile] | None = None) -> tuple[list[str], list[Sample]]:
    """List (path, label) for one split folder; with ``class_names`` labels follow that order.

    Refuses empty classes and classes unknown to ``class_names``. Files that are not images by their
    extension, and broken or looping symlinks, are refused naming the paths, or appended to ``bad``
    when a list is given. Hidden files and folders are ignored; symlinked folders are not followed.
    """
    found = find_classes(root)
    if class_names is None:
        class_names = found
    else:
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise DataError(
                f"Class folder(s) {extra} in {root} are not in the training split "
                f"(train classes: {list(class_names)}). Add training images or remove them."
            )
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[Sample] = []
    rejected: list[BadFile] = []
    for name in found:
        files: list[Path] = []
        # rglob does not descend into symlinked folders (no loops); is_file() is False for a broken
        # or self-referencing link, which is reported rather than silently dropped.
        for p in sorted((root / name).rglob("*")):
            if any(part.startswith(".") for part in p.relative_to(root).parts):
                continue
            if p.is_file():
                files.append(p)
            elif p.is_symlink() and not p.is_dir():
                rejected.append(BadFile(p, "broken or looping symlink"))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        rejected.extend(BadFile(p, "not an image file type") for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"Class {name!r} has no images in {root / name}. Add images or remove the folder.")
        samples.extend((p, index[name]) for p in images)
    if rejected:
        if bad is None:
            raise_bad_files(rejected, root, f"accepted types: {', '.join(IMAGE_EXTENSIONS)}")
        bad.extend(rejected)
    return list(class_names), samples


def raise_bad_files(bad: Sequence[BadFile], root: Path, hint: str = "") -> NoReturn:
    """One error naming the offending files (all of them in the log when there are many)."""
    if len(bad) > _SHOWN_BAD:
        for item in bad:
            _logger.error("bad file: %s", item)
    shown = "; ".join(str(b) for b in bad[:_SHOWN_BAD])
    more = f" and {len(bad) - _SHOWN_BAD} more (all listed above)" if len(bad) > _SHOWN_BAD else ""
    extra = f" ({hint})" if hint else ""
    raise DataError(
        f"{len(bad)} bad file(s) in {root}: {shown}{more}. Remove or replace them{extra}, "
        "or pass --on-bad-image skip to train without them."
    )


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a training image, or None when it decodes completely.

    The whole file is decoded (a truncated file passes a header check), through the same RGB
    conversion training uses; JPEGs decode at 1/8 scale, which still reads every byte.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            check_image_size(img, str(path))
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            to_rgb(img)
    except DataError as exc:
        return str(exc).split(": ", 1)[0]
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"{type(exc).__name__}: {exc}"[:160]
    return None


def find_bad_images(samples: Sequence[Sample]) -> list[BadFile]:
    """Decode every image up front, so a bad file is found now, not mid-epoch."""
    from tqdm import tqdm

    bad: list[BadFile] = []
    for path, _ in tqdm(samples, desc="checking images", unit="img", leave=False, disable=None):
        problem = image_problem(path)
        if problem is not None:
            bad.append(BadFile(path, problem))
    return bad


def check_images(samples: Sequence[Sample], root: Path | None = None) -> None:
    """Raise ``DataError`` naming every image that does not decode."""
    bad = find_bad_images(samples)
    if bad:
        raise_bad_files(bad, root if root is not None else Path(os.path.commonpath([str(p) for p, _ in samples])))


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off ``fraction`` of each class (at least one image per class), seeded."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"Invalid --val-fraction {fraction}: choose a fraction between 0 and 1.")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    keep: list[Sample] = []
    held: list[Sample] = []
    for label in sorted(by_class):
        items = by_class[label]
        if len(items) < 2:
            raise DataError(
                f"Class index {label} has {len(items)} image(s): --val-fraction needs at least 2 per class."
            )
        order = rng.permutation(len(items))
        n_held = min(len(items) - 1, max(1, round(len(items) * fraction)))
        held.extend(items[i] for i in order[:n_held])
        keep.extend(items[i] for i in order[n_held:])
    return keep, held


def load_splits(data_dir: str | os.PathLike[str], val_fraction: float | None = None, seed: int = 0,
                verify_images: bool = True, on_bad_image: str = "fail") -> Splits:
    """Read ``train/`` (+ ``val/``, optional ``test/``), or one folder split by ``val_fraction``.

    ``on_bad_image``: ``fail`` refuses a folder with any bad file (wrong type, empty, corrupt,
    truncated, too large), naming them all; ``skip`` leaves them out and lists them in ``skipped``.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise DataError(f"Invalid --on-bad-image {on_bad_image!r}. Only {', '.join(ON_BAD_IMAGE)} are supported.")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"Data folder not found: {root}. Pass --data pointing at an ImageFolder tree.")
    bad: list[BadFile] = []
    val: list[Sample] = []  # filled from val/, or split off train after bad files are dropped
    if (root / "train").is_dir():
        class_names, train = scan_split(root / "train", bad=bad)
        if (root / "val").is_dir():
            if val_fraction is not None:
                raise DataError(f"{root} already has val/; drop --val-fraction or remove {root / 'val'}.")
            _, val = scan_split(root / "val", class_names, bad=bad)
        elif val_fraction is None:
            raise DataError(f"{root} has train/ but no val/: add val/ or pass --val-fraction 0.1.")
        test: list[Sample] = []
        if (root / "test").is_dir():
            _, test = scan_split(root / "test", class_names, bad=bad)
    else:
        if val_fraction is None:
            raise DataError(
                f"{root} has no train/ folder. Use {root}/train/<class>/..., {root}/val/<class>/... "
                "or pass --val-fraction 0.1 to split one class-folder tree."
            )
        class_names, train = scan_split(root, bad=bad)
        test = []
    if len(class_names) < 2:
        raise DataError(f"Only one class ({class_names[0]!r}) in {root}: a classifier needs at least 2.")
    if verify_images:
        bad.extend(find_bad_images(train + val + test))
    if bad:
        if on_bad_image == "fail":
            raise_bad_files(bad, root)
        dropped = {b.path for b in bad}
        train, val, test = ([s for s in part if s[0] not in dropped] for part in (train, val, test))
        _logger.warning("skipping %d bad file(s) (--on-bad-image skip):", len(bad))
        for item in bad:
            _logger.warning("  skipped %s", item)
    if val_fraction is not None:  # split after dropping bad files, so both halves stay clean
        train, val = stratified_split(train, val_fraction, seed)
    missing = sorted(set(range(len(class_names))) - {label for _, label in train})
    if missing:
        raise DataError(f"Classes {[class_names[i] for i in missing]} have no training images.")
    _logger.info("data %s: %d classes, %d train / %d val / %d test", root, len(class_names),
                 len(train), len(val), len(test))
    return Splits(class_names=class_names, train=train, val=val, test=test, skipped=bad)


def load_model_splits(data_dir: str | os.PathLike[str], training: Any, val_fraction: float | None = None,
                      verify_images: bool = True) -> Splits:
    """The splits of ``data_dir`` as a model's training run saw them.

    ``training`` is the artifact's recorded training config: when the data has no ``val/``, the run's
    ``--val-fraction`` and ``--seed`` hold out the same images again (``val_fraction`` overrides the recorded
    fraction), so a model trained with ``--val-fraction`` can be evaluated, compared and benchmarked.
    """
    root = Path(data_dir)
    training = training if isinstance(training, dict) else {}
    seed = training.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"The model's config records an invalid training seed {seed!r}: re-run fine-tuning.")
    if val_fraction is None and not (root / "val").is_dir():
        # Artifacts written before the rename record "val_split".
        val_fraction = training.get("val_fraction", training.get("val_split"))
        if val_fraction is not None and (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
                                      or not 0 < val_fraction < 1):
            raise DataError(f"The model's config records an invalid val_fraction {val_fraction!r}: pass --val-fraction "
                            "with a fraction in (0, 1).")
    return load_splits(root, val_fraction, seed, verify_images=verify_images)


def limit_per_class(samples: Sequence[Sample], k: int, seed: int) -> list[Sample]:
    """Keep at most ``k`` images per class (few-shot), chosen with a seeded shuffle."""
    if k <= 0:
        raise DataError(f"Invalid --limit-per-class {k}: choose a positive number of images.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    counts: Counter[int] = Counter()
    out: list[Sample] = []
    for i in order:
        path, label = samples[i]
        if counts[label] < k:
            counts[label] += 1
            out.append((path, label))
    return sorted(out, key=lambda s: (s[1], str(s[0])))


def eval_transform(spec: PreprocessSpec) -> Transform:
    """Deterministic transform: the exact preprocessing every backend applies."""

    def transform(image: ImageInput) -> torch.Tensor:
        return torch.from_numpy(prepare(image, spec))  # (3, H, W)

    return transform


def train_transform(spec: PreprocessSpec, augment: bool = True) -> Transform:
    """Eval preprocessing plus light geometric augmentation that suits shapes and photos alike."""
    if not augment:
        return eval_transform(spec)
    from torchvision.transforms import v2

    aug = v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), fill=spec.background),
    ])

    def transform(image: ImageInput) -> torch.Tensor:
        img = aug(load_and_resize(image, spec))
        return torch.from_numpy(normalize(np.asarray(img, dtype=np.uint8), spec))  # (3, H, W)

    return transform


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """(path, label) samples -> (tensor, label) through a transform."""

    def __init__(self, samples: Sequence[Sample], transform: Transform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(path), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]
