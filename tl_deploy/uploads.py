"""What a visitor gives the page, read safely: uploaded images, zips, server folders; and classifying
them in batches. Uploads are read in memory: nothing is extracted or written to disk. Plain Python,
unit-tested without a browser (``tests/test_app.py``).
"""

from __future__ import annotations

import csv
import io
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tl_deploy.errors import DataError
from tl_deploy.preprocess import IMAGE_EXTENSIONS, open_image

UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: a large photo; decoding more could exhaust the server's memory
MAX_ZIP_FILES = 10_000  # images in one zip
MAX_ZIP_BYTES = 512 * 1024 * 1024  # uncompressed bytes read from one zip (zip bombs)
BATCH_CHUNK = 32  # images per predict() call in batch mode
MAX_WALK_ENTRIES = 100_000  # files and folders looked at in one server-folder walk, images or not
MAX_WALK_SECONDS = 10.0  # a server-folder walk stops here, whatever it has found


# ---------------------------------------------------------------------------------------------
# Reading uploads


@dataclass(frozen=True)
class ImageItem:
    """One image to classify: where it came from, its bytes or path, and its class folder if any."""

    name: str
    source: bytes | Path
    true_label: str | None = None


def read_image(source: bytes | Path, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an uploaded image to RGB, refusing oversized ones before decoding their pixels."""
    if isinstance(source, bytes) and not source:
        raise DataError(f"{name} is empty (0 bytes): upload a real image file.")
    try:
        # Image.open reads only the header; the pixel count is checked before anything is decoded.
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as header:
            width, height = header.size
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{name} is too large: {exc} The app's limit is {max_pixels / 1e6:g} MP; downscale it first."
        ) from exc
    except (OSError, SyntaxError, ValueError):
        width = height = 0  # not an image header: open_image below says so in one line
    if width * height > max_pixels:
        raise DataError(
            f"{name} is too large: {width}x{height} pixels ({width * height / 1e6:.0f} MP). The app's limit is "
            f"{max_pixels / 1e6:g} MP; downscale it first."
        )
    try:
        return open_image(source)
    except DataError as exc:
        cause = exc.__cause__
        detail = "unknown file format" if isinstance(cause, UnidentifiedImageError) else str(cause or exc)
        raise DataError(
            f"{name} is not a readable image ({detail}). Upload a PNG, JPEG, WebP or BMP file."
        ) from exc


def _label_from_parts(parts: Sequence[str], class_names: Sequence[str]) -> str | None:
    """The class folder an image sits in (its parent folder's name), when it is one of the model's classes."""
    return parts[-2] if len(parts) >= 2 and parts[-2] in class_names else None


def is_image_name(name: str) -> bool:
    base = PurePosixPath(name).name
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def read_zip(data: bytes, class_names: Sequence[str], *, max_files: int = MAX_ZIP_FILES,
             max_bytes: int = MAX_ZIP_BYTES) -> list[ImageItem]:
    """The images of a zip, read in memory (never extracted), with their class folder as label.

    Entries that would land outside the archive (``../x``, ``/etc/x``, ``C:\\x``) refuse the whole
    zip; so do more than ``max_files`` images or more than ``max_bytes`` uncompressed.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"Not a readable zip file ({exc}). Upload a .zip of images.") from exc
    items: list[ImageItem] = []
    total = 0
    with archive:
        for info in archive.infolist():
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                raise DataError(
                    f"Zip entry {info.filename!r} points outside the archive; the zip was refused. "
                    "Re-create it with relative paths."
                )
            if info.is_dir() or parts[:1] == ("__MACOSX",) or not is_image_name(name):
                continue
            if len(items) >= max_files:
                raise DataError(f"Zip holds more than {max_files} images: split it into smaller zips.")
            with archive.open(info) as fh:
                content = fh.read(max_bytes - total + 1)  # never trusts the declared size
            total += len(content)
            if total > max_bytes:
                raise DataError(
                    f"Zip expands to more than {max_bytes // (1024 * 1024)} MB of images: split it into smaller zips."
                )
            items.append(ImageItem(name, content, _label_from_parts(parts, class_names)))
    if not items:
        raise DataError(f"No images ({', '.join(UPLOAD_TYPES)}) in the zip.")
    return items


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_server_folder(text: str, roots: Sequence[Path]) -> Path:
    """The folder a visitor typed, resolved (symlinks followed) and checked to lie under one of ``roots``.

    Relative paths are read under each root in turn. ``..`` is refused as typed, and a path whose real
    location is outside every root (an absolute path elsewhere, a symlink out) is refused after resolving.
    """
    if not roots:
        raise DataError("No server folders are open to this page: the operator starts the app with "
                        "--data-root DIR to allow them. Upload a zip or a folder instead.")
    named = ", ".join(str(r) for r in roots)
    raw = Path(text.strip()).expanduser()
    if ".." in raw.parts:
        raise DataError(f"Folder {text!r} contains '..': give a folder under the data roots ({named}).")
    real_roots = [r.resolve() for r in roots]
    candidates = [raw] if raw.is_absolute() else [root / raw for root in real_roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if not _under(resolved, real_roots):
            raise DataError(f"Folder {text!r} is outside the data roots ({named}): the page reads only "
                            "under them. Start the app with --data-root DIR to add a root.")
        if resolved.is_dir():
            return resolved
    raise DataError(f"Folder not found: {text!r} under the data roots ({named}). Give a folder of images "
                    "(or of class folders).")


def scan_folder(root: str | os.PathLike[str], class_names: Sequence[str], max_files: int = MAX_ZIP_FILES, *,
                roots: Sequence[Path] | None = None, max_entries: int = MAX_WALK_ENTRIES,
                max_seconds: float = MAX_WALK_SECONDS) -> list[ImageItem]:
    """Images under a folder (recursively), labelled by their class folder when it is a known class.

    The walk is bounded while it runs: it stops at ``max_files`` images, ``max_entries`` entries or
    ``max_seconds``. Folder symlinks are not followed; a file symlink whose target is outside ``roots``
    (default: ``root`` itself) refuses the folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Folder not found: {root}. Give a folder of images (or of class folders).")
    real_roots = [r.resolve() for r in (roots if roots is not None else [root])]
    deadline = time.monotonic() + max_seconds
    paths: list[Path] = []
    seen = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        seen += len(dirs) + len(files)
        if seen > max_entries or time.monotonic() > deadline:
            raise DataError(f"{root} holds more than {min(seen, max_entries)} files and folders (or took over "
                            f"{max_seconds:g} s to list): pick a smaller folder.")
        for name in files:
            if not is_image_name(name):
                continue
            path = Path(folder) / name
            if path.is_symlink() and not _under(path.resolve(), real_roots):
                raise DataError(f"{path} links outside the data roots; the folder was refused. Remove the link.")
            if not path.is_file():
                continue
            paths.append(path)
            if len(paths) > max_files:
                raise DataError(f"More than {max_files} images under {root}: pick a smaller folder.")
    if not paths:
        raise DataError(f"No images ({', '.join(UPLOAD_TYPES)}) under {root}.")
    paths.sort()
    return [ImageItem(str(p.relative_to(root)), p, _label_from_parts(p.relative_to(root).parts, class_names))
            for p in paths]


def items_from_names(files: Iterable[tuple[str, bytes]], class_names: Sequence[str]) -> list[ImageItem]:
    """Browser-uploaded files (a folder upload keeps relative names) as items, labelled by folder."""
    items = []
    for name, data in files:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        items.append(ImageItem(name, data, _label_from_parts(parts, class_names)))
    return items


# ---------------------------------------------------------------------------------------------
# Batch classification


@dataclass
class BatchResult:
    """Predictions of a batch, one row per image; accuracy and confusion when labels are known."""

    rows: list[dict[str, Any]]
    class_names: list[str]
    seconds: float
    confusion: list[list[int]] | None = None  # confusion[true][pred] over labelled, readable images
    accuracy: float | None = None
    labelled: int = 0

    @property
    def errors(self) -> int:
        return sum(1 for r in self.rows if r["error"])

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["image", "prediction", "confidence", "true_label", "correct",
                                                 "error"], lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(row)
        return out.getvalue()


def classify_items(classifier: Any, items: Sequence[ImageItem], *,
                   progress: Callable[[int, int], None] | None = None,
                   max_pixels: int = MAX_IMAGE_PIXELS) -> BatchResult:
    """Classify ``items`` with a ``tl_deploy.runtime.Classifier``; unreadable images become error rows."""
    from tl_deploy.reports import classification_result

    names = list(classifier.class_names)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for lo in range(0, len(items), BATCH_CHUNK):
        chunk = items[lo:lo + BATCH_CHUNK]
        decoded: list[tuple[dict[str, Any], Image.Image]] = []
        for item in chunk:
            row: dict[str, Any] = {"image": item.name, "prediction": "", "confidence": None,
                                   "true_label": item.true_label or "", "correct": None, "error": ""}
            rows.append(row)
            try:
                decoded.append((row, read_image(item.source, item.name, max_pixels)))
            except DataError as exc:
                row["error"] = str(exc)
        if decoded:  # an image that fails in preprocessing (e.g. too large once resized) loses only its row
            results = classifier.predict_each([image for _, image in decoded], top_k=1)
            for (row, _), result in zip(decoded, results):
                if isinstance(result, DataError):
                    row["error"] = f"{row['image']}: {result}"
                    continue
                label, prob = result.labels[0][0], float(result.probabilities[0, 0])
                row["prediction"], row["confidence"] = label, round(prob, 4)
                if row["true_label"]:
                    row["correct"] = row["true_label"] == label
        if progress is not None:
            progress(min(lo + BATCH_CHUNK, len(items)), len(items))
    result = BatchResult(rows=rows, class_names=names, seconds=time.perf_counter() - start)
    scored = [r for r in rows if r["true_label"] and not r["error"]]
    if scored:
        index = {name: i for i, name in enumerate(names)}
        truth = np.array([index[r["true_label"]] for r in scored])
        preds = np.array([index[r["prediction"]] for r in scored])
        summary = classification_result(truth, preds, len(names))
        result.confusion, result.accuracy, result.labelled = summary.confusion, summary.accuracy, summary.count
    return result
