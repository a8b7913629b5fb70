"""What the Streamlit front end needs that is not drawing: finding models, reading uploads safely,
batch classification, the model card and the launcher. ``python -m tl_deploy.app [--model PATH]`` starts
the app on 127.0.0.1, with the default model loaded and warmed before the server answers.

The page itself (``app/streamlit_app.py``) only lays out widgets; everything here is plain Python,
unit-tested without a browser. Uploads are read in memory: nothing is extracted or written to disk.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import io
import ipaddress
import logging
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tl_deploy.errors import ArtifactError, DataError, TlDeployError
from tl_deploy.fileio import read_json
from tl_deploy.preprocess import IMAGE_EXTENSIONS, open_image

_logger = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
MODEL_ENV = "TL_DEPLOY_MODEL"  # model path for the page when no --model is given (tests, services)
DATA_ROOTS_ENV = "TL_DEPLOY_DATA_ROOTS"  # server folders the page may read, os.pathsep-separated, when no --data-root
EXPORT_ROOT = Path("export")  # where `python -m tl_deploy.export` writes by default
MODELS_ROOT = Path("models")  # where `python -m tl_deploy.finetune` writes by default
EXPORT_MANIFEST = "export.json"
ARTIFACT_CONFIG = "config.json"
UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")

MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: a large photo; decoding more could exhaust the server's memory
MAX_ZIP_FILES = 10_000  # images in one zip
MAX_ZIP_BYTES = 512 * 1024 * 1024  # uncompressed bytes read from one zip (zip bombs)
BATCH_CHUNK = 32  # images per predict() call in batch mode
MAX_WALK_ENTRIES = 100_000  # files and folders looked at in one server-folder walk, images or not
MAX_WALK_SECONDS = 10.0  # a server-folder walk stops here, whatever it has found
LOOPBACK_NAMES = ("localhost",)
# What the page's first run and first prediction would otherwise import while a visitor waits
# (measured: pyarrow for tables, altair for the top-5 chart); imported by the launcher before serving.
PAGE_IMPORTS = ("pandas", "pyarrow", "altair", "tl_deploy.parity", "tl_deploy.reports")


# ---------------------------------------------------------------------------------------------
# Finding models


def _newest_folders(root: str | os.PathLike[str], marker: str) -> list[Path]:
    """Folders directly under ``root`` that hold ``marker``, most recently written first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / marker).is_file() and not p.name.startswith(".")]
    return sorted(found, key=lambda p: (p / marker).stat().st_mtime, reverse=True)


def find_exports(root: str | os.PathLike[str] = EXPORT_ROOT) -> list[Path]:
    """Export folders (holding export.json) directly under ``root``, most recent first."""
    return _newest_folders(root, EXPORT_MANIFEST)


def find_artifacts(root: str | os.PathLike[str] = MODELS_ROOT) -> list[Path]:
    """Model artifact folders (holding config.json) directly under ``root``, most recent first."""
    return _newest_folders(root, ARTIFACT_CONFIG)


def default_model(export_root: str | os.PathLike[str] = EXPORT_ROOT,
                  models_root: str | os.PathLike[str] = MODELS_ROOT) -> Path:
    """The most recent export; else the most recent artifact (PyTorch); else a clear error."""
    exports = find_exports(export_root)
    if exports:
        return exports[0]
    artifacts = find_artifacts(models_root)
    if artifacts:
        return artifacts[0]
    raise ArtifactError(
        f"No model found: no export under {export_root}/ and no artifact under {models_root}/. Run `make demo` "
        "(or python -m tl_deploy.finetune, then python -m tl_deploy.export models/<run> --int8), "
        "or start the app with --model PATH."
    )


@dataclass(frozen=True)
class Engine:
    """One way to run the chosen model: the arguments of ``tl_deploy.runtime.load``."""

    label: str  # shown in the backend switch
    path: Path
    backend: str
    precision: str = "auto"

    @property
    def key(self) -> str:
        """What runs, as one string: the same key always loads the same file on the same backend."""
        return f"{self.backend}:{self.precision}:{self.path.resolve()}"


def _kind(path: Path) -> str:
    if path.is_file():
        return "file"
    return "artifact" if (path / ARTIFACT_CONFIG).is_file() else "export"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the page's model list: its key is unique by construction (kind and resolved folder)."""

    path: Path
    kind: str  # "export", "artifact" or "file"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path.resolve()}"

    @property
    def label(self) -> str:
        """Name, what it is and where: an export and its artifact share a run name but never a label."""
        resolved = self.path.resolve()
        try:
            where = str(resolved.relative_to(Path.cwd().resolve()))
        except ValueError:
            where = str(resolved)
        what = {"export": "export", "artifact": "artifact, PyTorch", "file": "file"}[self.kind]
        return f"{resolved.name} ({what}) · {where}"


def model_choices(wanted: Path | None, export_root: str | os.PathLike[str] = EXPORT_ROOT,
                  models_root: str | os.PathLike[str] = MODELS_ROOT) -> list[ModelChoice]:
    """The model given at start first, then the exports and artifacts found, each folder once."""
    paths = ([wanted] if wanted is not None else []) + find_exports(export_root) + find_artifacts(models_root)
    choices: dict[str, ModelChoice] = {}
    for path in paths:
        choice = ModelChoice(path, _kind(path))
        choices.setdefault(choice.key, choice)
    return list(choices.values())


def engine_text(classifier: Any) -> str:
    """What produced a prediction, in the words the page uses next to it: backend, precision, device, file."""
    return f"{classifier.backend_name} · {classifier.precision} on {classifier.device} · {Path(classifier.source).name}"


def model_stamp(path: Path) -> float:
    """Changes when the model on disk changes, so a cached classifier is reloaded."""
    for name in (EXPORT_MANIFEST, ARTIFACT_CONFIG):
        if (path / name).is_file():
            return (path / name).stat().st_mtime
    return path.stat().st_mtime if path.exists() else 0.0


@functools.cache
def backends_here() -> tuple[bool, bool, bool]:
    """(TensorRT usable, onnxruntime CUDA provider, torch installed): probed once per process."""
    from tl_deploy.runtime import ort_gpu_available, tensorrt_available

    return tensorrt_available(), ort_gpu_available(), torch_available()


# Classifiers loaded by the launcher before the server answers, taken by the page's first session.
_WARMED: dict[tuple[str, str, str, float], Any] = {}


def load_warm(path: Path, backend: str, precision: str) -> Any:
    """A classifier loaded and run once on a blank image, so the first latency a user sees is steady-state;
    the one the launcher warmed for this (file, backend, precision, file time) when there is one."""
    key = (str(path.resolve()), backend, precision, model_stamp(path))
    if key in _WARMED:
        return _WARMED.pop(key)
    from tl_deploy.runtime import load

    classifier = load(path, backend=backend, precision=precision)
    size = classifier.spec.input_size
    classifier.predict(np.zeros((size, size, 3), np.uint8))
    return classifier


def warm_start(model: Path) -> None:
    """Load the engine the page opens on (the first of ``available_engines``) into the warm cache."""
    trt_ok, _, torch_ok = backends_here()
    engine = available_engines(model, tensorrt_ok=trt_ok, torch_ok=torch_ok)[0]
    classifier = load_warm(engine.path, engine.backend, engine.precision)
    _WARMED[(str(engine.path.resolve()), engine.backend, engine.precision, model_stamp(engine.path))] = classifier


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"Cannot read {path}: {exc}. Re-create it (export or fine-tune again).") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object. Re-create it.")
    return data


def source_artifact(model: Path) -> Path | None:
    """The model artifact an export folder came from, when it is still on disk."""
    if (model / ARTIFACT_CONFIG).is_file():
        return model
    if not (model / EXPORT_MANIFEST).is_file():
        return None
    raw = (_read_json(model / EXPORT_MANIFEST).get("source") or {}).get("path")
    if not raw:
        return None
    for candidate in (Path(raw), model.parent.parent / raw):  # as written (cwd-relative), or from the repo root
        if (candidate / ARTIFACT_CONFIG).is_file():
            return candidate
    return None


def available_engines(model: Path, *, tensorrt_ok: bool, torch_ok: bool) -> list[Engine]:
    """Every backend/precision the model can run on here, fastest choice (``auto``) first."""
    if model.is_file():
        return [Engine(f"{model.suffix[1:]} file", model, "auto")]
    if (model / ARTIFACT_CONFIG).is_file():
        return [Engine("PyTorch", model, "torch")]
    files = [f for f in _read_json(model / EXPORT_MANIFEST).get("files", [])
             if f.get("status") == "ok" and f.get("input_layout", "float32_nchw") == "float32_nchw"]
    engines = [Engine("fastest available", model, "auto")]
    if tensorrt_ok:
        for precision in ("int8", "fp16", "fp32"):
            if any(f.get("kind") == "engine" and f.get("precision") == precision for f in files):
                engines.append(Engine(f"TensorRT {precision.upper()}", model, "tensorrt", precision))
    for precision in ("int8", "fp16", "fp32"):
        if any(f.get("kind") == "onnx" and f.get("precision") == precision for f in files):
            engines.append(Engine(f"ONNX Runtime {precision.upper()}", model, "onnxruntime", precision))
    artifact = source_artifact(model)
    if torch_ok and artifact is not None:
        engines.append(Engine("PyTorch", artifact, "torch"))
    return engines


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


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


def _is_image_name(name: str) -> bool:
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
            if info.is_dir() or parts[:1] == ("__MACOSX",) or not _is_image_name(name):
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
            if not _is_image_name(name):
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


# ---------------------------------------------------------------------------------------------
# Model card and sample gallery


@dataclass
class ModelCard:
    """What the page says about the loaded model, read from the files next to it."""

    path: Path
    kind: str  # "export", "artifact" or "file"
    artifact: Path | None  # the fine-tuned artifact, when on disk
    architecture: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # scalar metrics of the artifact
    files: list[dict[str, Any]] = field(default_factory=list)  # export.json "files"
    created: str = ""
    parity_markdown: str | None = None
    parity_json: dict[str, Any] | None = None
    parity_path: Path | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now, to start a server on."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_serving(url: str, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    """Poll Streamlit's health endpoint until it answers; TlDeployError if the server exits first or the
    time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TlDeployError(f"The app exited with code {proc.returncode} before serving {url}.")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TlDeployError(f"The app did not answer on {url} within {timeout:.0f} s.")


def parity_report_files(export_dir: Path) -> list[Path]:
    """Where ``python -m tl_deploy.parity`` writes its reports for this export (test split first)."""
    from tl_deploy.parity import report_paths

    return [path for split in ("test", "val") for path in reversed(report_paths(export_dir, split))]


def read_model_card(model: str | os.PathLike[str]) -> ModelCard:
    """Architecture, training setup and metrics, export files and the parity report, where present."""
    model = Path(model)
    kind = "file" if model.is_file() else "artifact" if (model / ARTIFACT_CONFIG).is_file() else "export"
    card = ModelCard(path=model, kind=kind, artifact=None if kind == "file" else source_artifact(model))
    if kind == "export":
        manifest = _read_json(model / EXPORT_MANIFEST)
        card.files = [dict(f) for f in manifest.get("files", [])]
        card.created = str(manifest.get("created", ""))
        card.architecture = str((manifest.get("source") or {}).get("architecture", ""))
        card.preprocess = dict((manifest.get("metadata") or {}).get("preprocess") or {})
        for path in parity_report_files(model):
            if not path.is_file():
                continue
            card.parity_path = card.parity_path or path
            if path.suffix == ".md":
                card.parity_markdown = path.read_text(errors="replace")
            else:
                try:
                    card.parity_json = _read_json(path)
                except ArtifactError:
                    card.parity_json = None
    if card.artifact is not None:
        config = _read_json(card.artifact / ARTIFACT_CONFIG)
        card.architecture = str((config.get("architecture") or {}).get("name", card.architecture))
        card.preprocess = card.preprocess or dict(config.get("preprocess") or {})
        card.training = dict(config.get("training") or {})
        card.metrics = {k: v for k, v in (config.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
    return card


def training_data(card: ModelCard) -> Path | None:
    """The ImageFolder the model was trained on, when it is on disk (relative paths: cwd, then repo root)."""
    raw = card.training.get("data")
    if not raw:
        return None
    candidates = [Path(str(raw))]
    if card.artifact is not None:
        candidates.append(card.artifact.parent.parent / str(raw))
    return next((c for c in candidates if c.is_dir()), None)


def default_data_roots(card: ModelCard) -> list[Path]:
    """The server folders the page may read when the operator names none: the model's own training data."""
    data = training_data(card)
    return [data.resolve()] if data is not None else []


def sample_gallery(card: ModelCard, class_names: Sequence[str], per_class: int = 2) -> list[ImageItem]:
    """A few images per class from the test split of the training data (val when there is no test)."""
    data = training_data(card)
    if data is None:
        return []
    split = next((data / s for s in ("test", "val") if (data / s).is_dir()), None)
    if split is None:
        return []
    samples = []
    for name in class_names:
        folder = split / name
        if folder.is_dir():
            paths = sorted(p for p in folder.iterdir() if p.is_file() and _is_image_name(p.name))[:per_class]
            samples += [ImageItem(f"{name}/{p.name}", p, name) for p in paths]
    return samples


# ---------------------------------------------------------------------------------------------
# Launcher


def get_args_parser() -> argparse.ArgumentParser:
    from tl_deploy.cli import Range, add_verbose, new_parser

    p = new_parser("app", "Start the Streamlit app that classifies images with an exported model.")
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="export folder, model artifact folder or .onnx/.engine file (default: newest under export/)")
    p.add_argument("--port", type=Range(int, 1, 65535), default=None, metavar="N",
                   help="port to serve on (default: Streamlit's, 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only); 0.0.0.0 serves every "
                        "interface and prints a warning")
    p.add_argument("--data-root", type=Path, action="append", default=None, dest="data_roots", metavar="DIR",
                   help="a server folder the Batch tab may read, repeatable (default: the model's own "
                        "training data when it is on disk, else none)")
    add_verbose(p)
    return p


def is_loopback(address: str) -> bool:
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def streamlit_args(model: Path | None, port: int | None, address: str,
                   data_roots: Sequence[Path] | None = None) -> list[str]:
    """``streamlit run app/streamlit_app.py`` arguments; the app's .streamlit/config.toml applies."""
    if not APP_SCRIPT.is_file():
        raise TlDeployError(f"App script not found: {APP_SCRIPT}. Run from a tl_deploy source checkout.")
    args = ["run", str(APP_SCRIPT), "--server.address", address]
    if port is not None:
        args += ["--server.port", str(port)]
    page = ["--model", str(model.resolve())] if model is not None else []
    for root in data_roots or []:
        page += ["--data-root", str(root.resolve())]
    return args + (["--", *page] if page else [])


def serve(args: Sequence[str]) -> int:
    """Run Streamlit's server in this process, so SIGTERM and SIGINT stop it (Streamlit's own handlers)
    and the classifier warmed here is the one the page uses: no child process is left behind."""
    from streamlit.web import cli as streamlit_cli

    try:
        streamlit_cli.main(args=list(args), prog_name="streamlit", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from tl_deploy.cli import run_cli

    def body(args: argparse.Namespace) -> int:
        if args.model is not None and not args.model.exists():
            raise ArtifactError(f"Model not found: {args.model}. Give an export folder, artifact folder or .onnx file.")
        if args.port is not None and not 1 <= args.port <= 65535:
            raise TlDeployError(f"Invalid --port {args.port}: give a port from 1 to 65535.")
        for root in args.data_roots or []:
            if not root.is_dir():
                raise DataError(f"--data-root {root} is not a folder: give an existing folder of images.")
        command = streamlit_args(args.model, args.port, args.address, args.data_roots)
        if not is_loopback(args.address):
            print(f"warning: serving on {args.address}, not only this machine: anyone who can reach this port can "
                  "classify images and read the folders under the data roots. Use --address 127.0.0.1 to serve "
                  "this machine only.", file=sys.stderr)
        try:
            model = args.model or default_model()
        except ArtifactError:
            model = None  # the page says what to run
        if model is not None:
            _logger.info("loading %s before serving", model)
            warm_start(model)
        for name in PAGE_IMPORTS:  # paid here rather than by the first visitor
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        return serve(command)

    return run_cli(body, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    # Through the package module, so the classifier warmed here sits where the page looks for it.
    from tl_deploy.app import main as package_main

    sys.exit(package_main())
