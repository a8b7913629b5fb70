"""Which models the page can offer and what it says about them: the exports and artifacts on disk,
the backends each can run on here (asked of the runtime), the classifiers warmed before serving, and
the model card (training setup, metrics, export files, parity report) with a sample gallery.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.errors import ArtifactError, DataError
from tl_deploy.fileio import read_json
from tl_deploy.formats.export_manifest import is_export_folder, read_export_manifest
from tl_deploy.formats.names import ARTIFACT_CONFIG, EXPORT_MANIFEST, parity_report_paths
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.uploads import ImageItem, is_image_name

_logger = logging.getLogger(__name__)

EXPORT_ROOT = Path("export")  # where `python -m tl_deploy.export` writes by default
MODELS_ROOT = Path("models")  # where `python -m tl_deploy.finetune` writes by default
BACKEND_LABELS = {"tensorrt": "TensorRT", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO",
                  "torch": "PyTorch"}  # the page's words


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
    from tl_deploy.runtime.gpu import ort_gpu_available, tensorrt_available

    return tensorrt_available(), ort_gpu_available(), torch_available()


def openvino_here() -> bool:
    """Whether the OpenVINO backend is installed (found, not imported)."""
    from tl_deploy.runtime.cpu import openvino_installed

    return openvino_installed()


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
    if not is_export_folder(model):
        return None
    raw = (read_export_manifest(model).get("source") or {}).get("path")
    if not raw:
        return None
    for candidate in (Path(raw), model.parent.parent / raw):  # as written (cwd-relative), or from the repo root
        if (candidate / ARTIFACT_CONFIG).is_file():
            return candidate
    return None


def available_engines(model: Path, *, tensorrt_ok: bool, torch_ok: bool, openvino_ok: bool = False) -> list[Engine]:
    """Every backend/precision the model can run on here, fastest choice (``auto``) first
    (``openvino_ok``: list OpenVINO's precisions too, bf16 where the CPU computes it natively)."""
    if model.is_file():
        return [Engine(f"{model.suffix[1:]} file", model, "auto")]
    if (model / ARTIFACT_CONFIG).is_file():
        return [Engine("PyTorch", model, "torch")]
    from tl_deploy.runtime import export_choices
    from tl_deploy.runtime.cpu import native_bf16

    engines = [Engine("fastest available", model, "auto")]
    for backend, precision in export_choices(model, tensorrt_ok=tensorrt_ok, openvino_ok=openvino_ok,
                                             bf16_ok=openvino_ok and native_bf16()):
        engines.append(Engine(f"{BACKEND_LABELS[backend]} {precision.upper()}", model, backend, precision))
    artifact = source_artifact(model)
    if torch_ok and artifact is not None:
        engines.append(Engine("PyTorch", artifact, "torch"))
    return engines


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


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

    def preprocess_origins(self) -> dict[str, str]:
        """Where each preprocessing value came from (model config, user flag, automatic rule); empty for
        models written before the spec recorded it."""
        source = self.preprocess.get("source")
        return {str(k): str(v) for k, v in source.items()} if isinstance(source, dict) else {}

    def input_description(self) -> str:
        """The model's preprocessing in one line, each value with its origin where recorded."""
        try:
            return PreprocessSpec.from_dict(self.preprocess).describe()
        except DataError:
            return ""


def parity_report_files(export_dir: Path) -> list[Path]:
    """Where ``python -m tl_deploy.parity`` writes its reports for this export (test split first)."""
    return [path for split in ("test", "val") for path in reversed(parity_report_paths(export_dir, split))]


def read_model_card(model: str | os.PathLike[str]) -> ModelCard:
    """Architecture, training setup and metrics, export files and the parity report, where present."""
    model = Path(model)
    kind = "file" if model.is_file() else "artifact" if (model / ARTIFACT_CONFIG).is_file() else "export"
    card = ModelCard(path=model, kind=kind, artifact=None if kind == "file" else source_artifact(model))
    if kind == "export":
        manifest = read_export_manifest(model)
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
            paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p.name))[:per_class]
            samples += [ImageItem(f"{name}/{p.name}", p, name) for p in paths]
    return samples
