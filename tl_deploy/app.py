"""What the Streamlit front end needs that is not drawing: finding models, reading uploads safely,
batch classification and the model card. ``python -m tl_deploy.app [--model PATH]`` starts the app.

The page itself (``app/streamlit_app.py``) only lays out widgets; everything here is plain Python,
unit-tested without a browser. Uploads are read in memory: nothing is extracted or written to disk.
"""

from __future__ import annotations

import argparse
import csv
import io
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
EXPORT_ROOT = Path("export")  # where `python -m tl_deploy.export` writes by default
MODELS_ROOT = Path("models")  # where `python -m tl_deploy.finetune` writes by default
EXPORT_MANIFEST = "export.json"
ARTIFACT_CONFIG = "config.json"
UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")

MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: a large photo; decoding more could exhaust the server's memory
MAX_ZIP_FILES = 10_000  # images in one zip
MAX_ZIP_BYTES = 512 * 1024 * 1024  # uncompressed bytes read from one zip (zip bombs)
BATCH_CHUNK = 32  # images per predict() call in batch mode


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
    for precision in ("int8", "fp32"):
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


def scan_folder(root: str | os.PathLike[str], class_names: Sequence[str], max_files: int = MAX_ZIP_FILES,
                ) -> list[ImageItem]:
    """Images under a folder (recursively), labelled by their class folder when it is a known class."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Folder not found: {root}. Give a folder of images (or of class folders).")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and _is_image_name(p.name))
    if not paths:
        raise DataError(f"No images ({', '.join(UPLOAD_TYPES)}) under {root}.")
    if len(paths) > max_files:
        raise DataError(f"{len(paths)} images under {root}, more than {max_files}: pick a smaller folder.")
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
        if decoded:
            labels, probs = classifier.predict([image for _, image in decoded], top_k=1)
            for (row, _), label, prob in zip(decoded, labels, probs):
                row["prediction"], row["confidence"] = label[0], round(float(prob[0]), 4)
                if row["true_label"]:
                    row["correct"] = row["true_label"] == label[0]
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
    p = argparse.ArgumentParser(prog="python -m tl_deploy.app",
                                description="Start the Streamlit app that classifies images with an exported model.")
    p.add_argument("--model", type=Path, default=None,
                   help="export folder, model artifact folder or .onnx/.engine file (default: newest under export/)")
    p.add_argument("--port", type=int, default=None, help="port to serve on (default: Streamlit's, 8501)")
    p.add_argument("--address", default=None, help="address to bind (default: Streamlit's)")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    return p


def streamlit_command(model: Path | None, port: int | None, address: str | None) -> list[str]:
    """``streamlit run app/streamlit_app.py`` with the options; the app's .streamlit/config.toml applies."""
    if not APP_SCRIPT.is_file():
        raise TlDeployError(f"App script not found: {APP_SCRIPT}. Run from a tl_deploy source checkout.")
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT)]
    if port is not None:
        cmd += ["--server.port", str(port)]
    if address is not None:
        cmd += ["--server.address", address]
    if model is not None:
        cmd += ["--", "--model", str(model.resolve())]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    from tl_deploy.cli import run_cli

    def body(args: argparse.Namespace) -> int:
        if args.model is not None and not args.model.exists():
            raise ArtifactError(f"Model not found: {args.model}. Give an export folder, artifact folder or .onnx file.")
        command = streamlit_command(args.model, args.port, args.address)
        try:
            return subprocess.call(command)
        except KeyboardInterrupt:  # Ctrl+C reaches the server too: the normal way to stop it
            return 0

    return run_cli(body, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
