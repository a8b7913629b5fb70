"""Load any tl_deploy model and classify images with it: ``load(path, backend="auto")``.

``path`` may be a model artifact folder (torch backend), an export folder (the best file in it is
picked), or a single ``.onnx`` / ``.engine`` file. Backends are imported lazily, so the onnxruntime
path never imports torch: edge code needs only ``numpy pillow onnxruntime``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tl_deploy.errors import ArtifactError, BackendUnavailableError, TlDeployError
from tl_deploy.export.metadata import FLOAT_NCHW
from tl_deploy.fileio import read_json
from tl_deploy.runtime.base import Classifier, Prediction, Runner, softmax

__all__ = ["BACKENDS", "Classifier", "Prediction", "Runner", "choose_export_file", "export_file", "load",
           "read_export_manifest", "softmax", "verify_export_file"]

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
EXPORT_MANIFEST = "export.json"
ARTIFACT_CONFIG = "config.json"


# glibc's mallopt parameter and the size from which blocks are always mmapped (returned on free).
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 8 * 2**20


@functools.cache  # once per process
def fix_mmap_threshold() -> bool:
    """Make glibc malloc return every block of 8 MiB or more to the system when it is freed.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32
    MiB), so later decoded photos (Pillow's 16 MiB blocks) and large activations are carved from
    the arena of the thread that made them, and each thread's arena keeps its peak: under a
    sustained multi-threaded load resident memory rose for minutes (bench/soak.py). A fixed
    threshold turns that adjustment off. Skipped off glibc, and when ``MALLOC_MMAP_THRESHOLD_`` is
    set (the user's choice wins). Returns whether it was applied.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))


def tensorrt_available() -> bool:
    """True when TensorRT, cuda-python and a CUDA GPU are all present."""
    from tl_deploy.export.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailableError:
        return False
    return True


def ort_gpu_available() -> bool:
    """Whether onnxruntime's build has the CUDA provider; ``load`` checks that a session really gets it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_export_file(files: Sequence[Mapping[str, Any]], *, backend: str, precision: str,
                       tensorrt_ok: bool, ort_gpu: bool) -> tuple[Mapping[str, Any], str]:
    """Pick the file of an export folder to load, and say why (pure).

    ``auto`` means fastest: a TensorRT engine when TensorRT works here (INT8 > FP16 > FP32), else
    onnxruntime: on CPU the CPU-tuned INT8 file, then FP32; on a CUDA provider FP32. ``fp16`` on
    onnxruntime is ``model.fp16.onnx`` (never picked by ``auto``: its speed is not measured yet).
    Baked-preprocess files are never picked (load them by path).
    """
    if backend not in BACKENDS:
        raise TlDeployError(f"Invalid backend {backend!r}. Only {', '.join(BACKENDS)} exist.")
    if precision not in PRECISIONS:
        raise TlDeployError(f"Invalid precision {precision!r}. Only {', '.join(PRECISIONS)} exist.")
    usable = [f for f in files if f.get("status") == "ok" and f.get("input_layout", FLOAT_NCHW) == FLOAT_NCHW]
    engines = [f for f in usable if f.get("kind") == "engine"]
    onnx_files = [f for f in usable if f.get("kind") == "onnx"]
    if backend == "torch":
        raise ArtifactError("An export folder holds no PyTorch model: load the model artifact folder for torch.")

    def by_precision(cands: list[Mapping[str, Any]], order: Sequence[str]) -> Mapping[str, Any] | None:
        for want in order:
            for cand in cands:
                if cand.get("precision") == want:
                    return cand
        return None

    if backend in ("auto", "tensorrt") and engines and tensorrt_ok:
        order = ("int8", "fp16", "fp32") if precision == "auto" else (precision,)
        chosen = by_precision(engines, order)
        if chosen is not None:
            return chosen, "TensorRT is available and the folder has an engine"
    if backend == "tensorrt":
        if not tensorrt_ok:
            raise BackendUnavailableError("backend='tensorrt' asked for but TensorRT/CUDA is not usable here.")
        raise ArtifactError(f"No {precision} TensorRT engine in this export folder: export it with --trt.")
    why = "TensorRT not usable here" if engines and not tensorrt_ok else "no engine in the folder" \
        if not engines else "no engine of that precision"
    # On CPU the CPU-tuned INT8 file is the fastest; CUDA runs the float graph (or the QDQ file).
    cpu_int8 = [f for f in onnx_files if f.get("precision") == "int8" and f.get("target") == "cpu"]
    qdq_int8 = [f for f in onnx_files if f.get("precision") == "int8" and f.get("target") != "cpu"]
    fp32 = [f for f in onnx_files if f.get("precision") == "fp32"]
    fp16 = [f for f in onnx_files if f.get("precision") == "fp16"]
    if precision == "auto":
        ranked = fp32 + cpu_int8 if ort_gpu else cpu_int8 + fp32
    elif precision == "int8":
        ranked = qdq_int8 + cpu_int8 if ort_gpu else cpu_int8 + qdq_int8
    elif precision == "fp32":
        ranked = fp32
    else:
        ranked = fp16
    if not ranked:
        raise ArtifactError(f"No {precision} ONNX file usable by onnxruntime in this export folder.")
    return ranked[0], f"onnxruntime ({why})"


def read_export_manifest(folder: Path) -> dict[str, Any]:
    """An export folder's ``export.json``, checked: every entry names a plain file inside the folder."""
    path = folder / EXPORT_MANIFEST
    try:
        manifest = read_json(path)
    except ValueError as exc:
        raise ArtifactError(f"Corrupt {path}: {exc}. Re-run the export.") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ArtifactError(f"{path} is not a tl_deploy export manifest. Re-run the export.")
    for entry in manifest["files"]:
        name = entry.get("file") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{path} lists {name!r}, which is not a file there: an export manifest "
                                f"names only plain file names inside {folder}. Re-run the export.")
    return manifest


def export_file(folder: Path, name: str, manifest: Mapping[str, Any], *, verify: bool = True) -> Path:
    """The one way to open a file of an export folder: ``name`` must be a file there that
    ``manifest`` lists, and (``verify``) match its recorded sha256. Returns its path."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or not path.is_file():
        raise ArtifactError(f"{folder / EXPORT_MANIFEST} lists {name!r}, which is not a file there. "
                            "Re-run the export.")
    if not any(isinstance(f, Mapping) and f.get("file") == name for f in manifest["files"]):
        raise ArtifactError(f"{path} is not listed in {folder / EXPORT_MANIFEST}. Re-run the export.")
    if verify:
        verify_export_file(path, manifest)
    return path


def verify_export_file(path: Path, manifest: Mapping[str, Any] | None = None) -> None:
    """Check ``path`` against the sha256 its folder's export.json records; a lone file passes.

    Raises ``ArtifactError`` when the file was modified, or when export.json lists it without a
    checksum. Only files that the manifest names are checked (an engine also has its sidecar).
    """
    folder = path.parent
    if manifest is None:
        if not (folder / EXPORT_MANIFEST).is_file():
            return
        manifest = read_export_manifest(folder)
    entries = [f for f in manifest["files"] if isinstance(f, Mapping) and f.get("file") == path.name]
    if not entries:
        return
    expected = entries[0].get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise ArtifactError(f"{folder / EXPORT_MANIFEST} records no sha256 for {path.name}. Re-run the export.")
    from tl_deploy.fileio import sha256_file

    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"Export file {path} was modified (sha256 {actual[:12]}..., {EXPORT_MANIFEST} says "
            f"{expected[:12]}...). Re-export it, or load with verify=False (--no-verify) to use it anyway."
        )


def load(path: str | os.PathLike[str], backend: str = "auto", *, precision: str = "auto",
         providers: Sequence[str] | None = None, threads: int | None = None,
         device: str | None = None, verify: bool = True) -> Classifier:
    """Load a classifier; ``.backend_name`` and ``.precision`` say what was picked (also logged).

    ``backend``: auto | torch | onnxruntime | tensorrt. ``precision`` (export folders): auto | fp32 |
    fp16 | int8. ``providers``/``threads``: onnxruntime options. ``device``: ``cpu``, ``cuda`` or
    ``cuda:N``, for torch, onnxruntime and TensorRT engines (``cpu``: onnxruntime's CPU provider only;
    None: a GPU when one is usable).
    ``verify``: check the sha256 manifest (artifact's manifest.json, or the export folder's
    export.json) before loading; ``False`` loads a modified file deliberately.
    """
    if backend not in BACKENDS:
        raise TlDeployError(f"Invalid backend {backend!r}. Only {', '.join(BACKENDS)} exist.")
    fix_mmap_threshold()
    path = Path(path)
    if path.is_file():
        if verify:
            verify_export_file(path)
        classifier = _load_file(path, backend, providers=providers, threads=threads, device=device)
    elif (path / ARTIFACT_CONFIG).is_file():
        if backend not in ("auto", "torch"):
            raise ArtifactError(
                f"{path} is a model artifact, which only the torch backend runs: export it first with "
                f"python -m tl_deploy.export {path}, then load the export folder or its .onnx file."
            )
        from tl_deploy.runtime.torch_backend import load_torch

        classifier = load_torch(path, device=device, verify=verify)
    elif (path / EXPORT_MANIFEST).is_file():
        manifest = read_export_manifest(path)
        files = [f for f in manifest["files"] if isinstance(f, Mapping)]
        has_engine = any(f.get("kind") == "engine" for f in files)
        wants_trt = backend in ("auto", "tensorrt") and device != "cpu" and has_engine
        wants_gpu = device != "cpu" and (providers is None or "CUDAExecutionProvider" in providers)
        tensorrt_ok = wants_trt and tensorrt_available()
        ort_gpu = wants_gpu and ort_gpu_available()
        classifier = _load_from_folder(path, manifest, files, backend=backend, precision=precision,
                                       tensorrt_ok=tensorrt_ok, ort_gpu=ort_gpu, providers=providers,
                                       threads=threads, device=device, verify=verify)
        if ort_gpu and classifier.backend_name == "onnxruntime" and classifier.device == "cpu":
            # onnxruntime's build lists CUDA, but the session could not start it (logged): the file the
            # CPU runs fastest instead of the one picked for the GPU.
            classifier = _load_from_folder(path, manifest, files, backend=backend, precision=precision,
                                           tensorrt_ok=tensorrt_ok, ort_gpu=False, providers=providers,
                                           threads=threads, device=device, verify=verify)
    elif path.exists():
        raise ArtifactError(
            f"{path} is neither a model artifact (no {ARTIFACT_CONFIG}) nor an export folder "
            f"(no {EXPORT_MANIFEST}), nor an .onnx/.engine file."
        )
    else:
        raise ArtifactError(f"Model not found: {path}.")
    _logger.info("loaded %s with backend=%s precision=%s device=%s", classifier.source,
                 classifier.backend_name, classifier.precision, classifier.device)
    return classifier


def _load_from_folder(folder: Path, manifest: Mapping[str, Any], files: Sequence[Mapping[str, Any]], *,
                      backend: str, precision: str, tensorrt_ok: bool, ort_gpu: bool,
                      providers: Sequence[str] | None, threads: int | None, device: str | None,
                      verify: bool) -> Classifier:
    entry, reason = choose_export_file(files, backend=backend, precision=precision, tensorrt_ok=tensorrt_ok,
                                       ort_gpu=ort_gpu)
    _logger.info("export folder %s: picked %s (%s)", folder, entry["file"], reason)
    chosen = export_file(folder, str(entry["file"]), manifest, verify=verify)
    return _load_file(chosen, "auto", providers=providers, threads=threads, device=device)


def cuda_device_index(device: str | None) -> int:
    """``None``/``"cuda"`` -> 0, ``"cuda:1"`` -> 1; anything else is refused (TensorRT runs on a GPU)."""
    if device is None or device == "cuda":
        return 0
    head, _, index = device.partition(":")
    if head != "cuda" or not index.isdigit():
        raise TlDeployError(f"Invalid device {device!r} for a TensorRT engine: use cuda or cuda:N (N = GPU index).")
    return int(index)


def _load_file(path: Path, backend: str, *, providers: Sequence[str] | None,
               threads: int | None, device: str | None = None) -> Classifier:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if backend not in ("auto", "onnxruntime"):
            raise ArtifactError(
                f"{path.name} is an ONNX file: load it with backend='onnxruntime' (or build an engine "
                "with python -m tl_deploy.export MODEL_DIR --trt for backend='tensorrt')."
            )
        from tl_deploy.runtime.onnxruntime_backend import gpu_index, load_onnx

        if providers is not None and "TensorrtExecutionProvider" in providers:
            from tl_deploy.export.tensorrt import check_ort_tensorrt_versions

            check_ort_tensorrt_versions()
        if providers is None and device == "cpu":
            providers = ["CPUExecutionProvider"]
        return load_onnx(path, providers=providers, device_id=gpu_index(device), threads=threads)
    if suffix in (".engine", ".plan"):
        if backend not in ("auto", "tensorrt"):
            raise ArtifactError(f"{path.name} is a TensorRT engine: only backend='tensorrt' runs it.")
        from tl_deploy.runtime.tensorrt_backend import load_engine

        return load_engine(path, device=cuda_device_index(device))
    raise ArtifactError(f"Unknown model file type {path.name!r}: expected .onnx or .engine.")
