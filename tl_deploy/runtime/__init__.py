"""Load any tl_deploy model and classify images with it: ``load(path, backend="auto")``.

``path`` may be a model artifact folder (torch backend), an export folder (the best file in it is
picked), or a single ``.onnx`` / ``.engine`` file. Backends are imported lazily, so the onnxruntime
and OpenVINO paths never import torch: edge code needs only ``numpy pillow onnxruntime`` (or
``openvino``). The runtime reads the file formats (``tl_deploy.formats``) and nothing from training
or export.

=========================  =================================================================
``runtime.base``           ``Runner``: the lifecycle every backend shares (activate/infer/deactivate)
``runtime.classifier``     ``Classifier``: runner + metadata + preprocessing; ``Prediction``
``runtime.gpu``            what this machine offers: GPU index, CUDA, TensorRT, onnxruntime-gpu
``runtime.cpu``            what this CPU offers, and the measured rule that lets ``auto`` pick OpenVINO
``runtime.catalog``        the named backends of an export folder, for parity and bench
``runtime.*_backend``      one runner (and its loader) per backend
=========================  =================================================================
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
from tl_deploy.formats.export_manifest import (
    export_file,
    is_export_folder,
    listed_files,
    read_export_manifest,
    usable_files,
    verify_export_file,
)
from tl_deploy.formats.names import (
    ARTIFACT_CONFIG,
    COMPUTE_PRECISIONS,
    ENGINE_SUFFIXES,
    EXPORT_MANIFEST,
    ONNX_SUFFIX,
)
from tl_deploy.runtime.base import Runner
from tl_deploy.runtime.classifier import Classifier, Prediction, softmax
from tl_deploy.runtime.cpu import openvino_auto_choice
from tl_deploy.runtime.gpu import gpu_index, ort_gpu_available, tensorrt_available

__all__ = ["BACKENDS", "Classifier", "Prediction", "Runner", "choose_export_file", "choose_openvino_file",
           "export_choices", "load", "softmax"]

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
LOAD_PRECISIONS = ("auto", *COMPUTE_PRECISIONS)  # what load(precision=...) accepts (bf16: OpenVINO only)
FASTEST_FIRST = ("int8", "fp16", "fp32")


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


def choose_export_file(files: Sequence[Mapping[str, Any]], *, backend: str, precision: str,
                       tensorrt_ok: bool, ort_gpu: bool) -> tuple[Mapping[str, Any], str]:
    """Pick the file of an export folder to load, and say why (pure).

    ``auto`` means fastest: a TensorRT engine when TensorRT works here (INT8 > FP16 > FP32), else
    onnxruntime: on CPU the CPU-tuned INT8 file, then FP32; on a CUDA provider FP32. ``fp16`` on
    onnxruntime is ``model.fp16.onnx`` (never picked by ``auto``: its speed is not measured yet).
    Baked-preprocess files are never picked (load them by path). ``backend='openvino'`` or
    ``precision='bf16'``: ``choose_openvino_file``. (``load`` may then switch a CPU ``auto`` pick to
    OpenVINO INT8: that rule looks at the machine, so it is not in this pure function.)
    """
    if backend not in BACKENDS:
        raise TlDeployError(f"Invalid backend {backend!r}. Only {', '.join(BACKENDS)} exist.")
    if precision not in LOAD_PRECISIONS:
        raise TlDeployError(f"Invalid precision {precision!r}. Only {', '.join(LOAD_PRECISIONS)} exist.")
    usable = usable_files(files)
    engines = [f for f in usable if f.get("kind") == "engine"]
    onnx_files = [f for f in usable if f.get("kind") == "onnx"]
    if backend == "torch":
        raise ArtifactError("An export folder holds no PyTorch model: load the model artifact folder for torch.")
    if backend == "openvino" or precision == "bf16":
        return choose_openvino_file(files, precision=precision), "OpenVINO, as asked"

    def by_precision(cands: list[Mapping[str, Any]], order: Sequence[str]) -> Mapping[str, Any] | None:
        for want in order:
            for cand in cands:
                if cand.get("precision") == want:
                    return cand
        return None

    if backend in ("auto", "tensorrt") and engines and tensorrt_ok:
        order = FASTEST_FIRST if precision == "auto" else (precision,)
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


# OpenVINO's file per asked precision, first found wins: the QDQ INT8 file is its fastest (docs/speed.md),
# bf16 is the FP32 file computed in bf16.
OPENVINO_ORDER = {"auto": ("int8", "fp32"), "int8": ("int8",), "fp16": ("fp16",), "fp32": ("fp32",),
                  "bf16": ("fp32",)}


def choose_openvino_file(files: Sequence[Mapping[str, Any]], *, precision: str) -> Mapping[str, Any]:
    """The file of an export folder OpenVINO runs for ``precision`` (pure): INT8 is the QDQ file
    (``model.int8.cpu.onnx`` is tuned for onnxruntime), bf16 and fp32 the FP32 file."""
    if precision not in OPENVINO_ORDER:
        raise TlDeployError(f"Invalid precision {precision!r}. Only {', '.join(OPENVINO_ORDER)} exist.")
    onnx_files = [f for f in usable_files(files) if f.get("kind") == "onnx"]
    for want in OPENVINO_ORDER[precision]:
        for entry in onnx_files:
            if entry.get("precision") == want and (want != "int8" or entry.get("target") != "cpu"):
                return entry
    raise ArtifactError(f"No ONNX file for OpenVINO {precision} in this export folder (it runs "
                        f"{' or '.join(OPENVINO_ORDER[precision])} files): export it, or choose another precision.")


def export_choices(folder: Path, *, tensorrt_ok: bool, openvino_ok: bool = False,
                   bf16_ok: bool = False) -> list[tuple[str, str]]:
    """The (backend, precision) pairs ``load(folder, backend, precision=...)`` can run here: TensorRT
    engines first when ``tensorrt_ok``, then OpenVINO when ``openvino_ok`` (installed; faster than
    onnxruntime where measured), then onnxruntime files; INT8 > FP16 > FP32 within each, and OpenVINO's
    bf16 (the FP32 file computed in bf16) after its INT8 when ``bf16_ok`` (a CPU with native bf16)."""
    files = usable_files(read_export_manifest(folder)["files"])
    kinds = ([("tensorrt", "engine")] if tensorrt_ok else []) + ([("openvino", "onnx")] if openvino_ok else []) \
        + [("onnxruntime", "onnx")]
    choices = []
    for backend, kind in kinds:
        order = ("int8", "bf16", "fp16", "fp32") if backend == "openvino" and bf16_ok else FASTEST_FIRST
        for precision in order:
            if backend == "openvino":
                try:  # OpenVINO's own file rule (its INT8 is the QDQ file, bf16 computes the FP32 file)
                    choose_openvino_file(files, precision=precision)
                except ArtifactError:
                    continue
            elif not any(f.get("kind") == kind and f.get("precision") == precision for f in files):
                continue
            choices.append((backend, precision))
    return choices


def load(path: str | os.PathLike[str], backend: str = "auto", *, precision: str = "auto",
         providers: Sequence[str] | None = None, threads: int | None = None,
         device: str | None = None, verify: bool = True, streams: int = 1) -> Classifier:
    """Load a classifier; ``.backend_name`` and ``.precision`` say what was picked (also logged).

    ``backend``: auto | torch | onnxruntime | openvino | tensorrt. ``precision`` (export folders): auto
    | fp32 | fp16 | int8 | bf16 (OpenVINO computing the FP32 file; also for an ``.onnx`` path).
    ``providers``: onnxruntime's; ``threads``: onnxruntime's and OpenVINO's. ``device``: ``cpu``,
    ``cuda`` or ``cuda:N``, for torch, onnxruntime and TensorRT engines (``cpu``: onnxruntime's CPU
    provider only; None: a GPU when one is usable). ``auto`` on the CPU picks OpenVINO where it is
    installed on an x86 CPU with AMX (bf16) or VNNI (INT8), both measured faster (``runtime.cpu``,
    docs/speed.md), else onnxruntime; the choice and the reason are logged.
    ``verify``: check the sha256 manifest (artifact's manifest.json, or the export folder's
    export.json) before loading; ``False`` loads a modified file deliberately.
    ``streams``: on the CPU, onnxruntime and OpenVINO split ``threads`` between that many ``infer``
    calls running at once from as many threads (``Classifier.streams`` says how many the backend
    took: 1 on a GPU, for torch and TensorRT); one call alone then has only its share of the threads.
    """
    if backend not in BACKENDS:
        raise TlDeployError(f"Invalid backend {backend!r}. Only {', '.join(BACKENDS)} exist.")
    if streams < 1:
        raise TlDeployError(f"Invalid streams={streams}: choose 1 or more.")
    fix_mmap_threshold()
    path = Path(path)
    if path.is_file():
        if verify:
            verify_export_file(path)
        classifier = _load_file(path, backend, precision=precision, providers=providers, threads=threads,
                                device=device, streams=streams)
    elif (path / ARTIFACT_CONFIG).is_file():
        if backend not in ("auto", "torch"):
            raise ArtifactError(
                f"{path} is a model artifact, which only the torch backend runs: export it first with "
                f"python -m tl_deploy.export {path}, then load the export folder or its .onnx file."
            )
        from tl_deploy.runtime.torch_backend import load_torch

        classifier = load_torch(path, device=device, verify=verify)
    elif is_export_folder(path):
        manifest = read_export_manifest(path)
        files = listed_files(manifest)
        has_engine = any(f.get("kind") == "engine" for f in files)
        wants_trt = backend in ("auto", "tensorrt") and device != "cpu" and has_engine
        wants_gpu = device != "cpu" and (providers is None or "CUDAExecutionProvider" in providers)
        tensorrt_ok = wants_trt and tensorrt_available()
        ort_gpu = wants_gpu and ort_gpu_available()
        classifier = _load_from_folder(path, manifest, files, backend=backend, precision=precision,
                                       tensorrt_ok=tensorrt_ok, ort_gpu=ort_gpu, providers=providers,
                                       threads=threads, device=device, verify=verify, streams=streams)
        if ort_gpu and classifier.backend_name == "onnxruntime" and classifier.device == "cpu":
            # onnxruntime's build lists CUDA, but the session could not start it (logged): the file the
            # CPU runs fastest instead of the one picked for the GPU.
            classifier = _load_from_folder(path, manifest, files, backend=backend, precision=precision,
                                           tensorrt_ok=tensorrt_ok, ort_gpu=False, providers=providers,
                                           threads=threads, device=device, verify=verify, streams=streams)
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
                      verify: bool, streams: int = 1) -> Classifier:
    entry, reason = choose_export_file(files, backend=backend, precision=precision, tensorrt_ok=tensorrt_ok,
                                       ort_gpu=ort_gpu)
    runtime = "openvino" if backend == "openvino" or precision == "bf16" else "auto"
    if backend == precision == "auto" and entry.get("kind") == "onnx" and not ort_gpu and providers is None \
            and device in (None, "cpu"):
        entry, reason, runtime, precision = _auto_cpu_choice(files, entry, reason)
    _logger.info("export folder %s: picked %s (%s)", folder, entry["file"], reason)
    chosen = export_file(folder, str(entry["file"]), manifest, verify=verify)
    return _load_file(chosen, runtime, precision=precision, providers=providers, threads=threads, device=device,
                      streams=streams)


def _auto_cpu_choice(files: Sequence[Mapping[str, Any]], entry: Mapping[str, Any],
                     reason: str) -> tuple[Mapping[str, Any], str, str, str]:
    """``auto`` on the CPU: OpenVINO bf16 or INT8 where the measured rule holds (``runtime.cpu``), else
    onnxruntime's pick; (file entry, why, backend and precision for ``_load_file``)."""
    precision, why = openvino_auto_choice()
    if precision is not None:
        try:
            chosen = choose_openvino_file(files, precision=precision)
        except ArtifactError:
            why = f"the folder has no file for OpenVINO {precision}"
        else:
            return chosen, why, "openvino", precision
    return entry, f"{reason}; not OpenVINO: {why}", "auto", "auto"


def _load_file(path: Path, backend: str, *, precision: str = "auto", providers: Sequence[str] | None,
               threads: int | None, device: str | None = None, streams: int = 1) -> Classifier:
    suffix = path.suffix.lower()
    if suffix == ONNX_SUFFIX and (backend == "openvino" or precision == "bf16"):
        return _load_openvino(path, backend, precision=precision, providers=providers, threads=threads,
                              device=device, streams=streams)
    if suffix == ONNX_SUFFIX:
        if backend not in ("auto", "onnxruntime"):
            raise ArtifactError(
                f"{path.name} is an ONNX file: load it with backend='onnxruntime' or 'openvino' (or build an "
                "engine with python -m tl_deploy.export MODEL_DIR --trt for backend='tensorrt')."
            )
        from tl_deploy.runtime.onnxruntime_backend import load_onnx

        if providers is not None and "TensorrtExecutionProvider" in providers:
            from tl_deploy.runtime.gpu import check_ort_tensorrt_versions

            check_ort_tensorrt_versions()
        if providers is None and device == "cpu":
            providers = ["CPUExecutionProvider"]
        return load_onnx(path, providers=providers, device_id=gpu_index(device), threads=threads, streams=streams)
    if suffix in ENGINE_SUFFIXES:
        if backend not in ("auto", "tensorrt"):
            raise ArtifactError(f"{path.name} is a TensorRT engine: only backend='tensorrt' runs it.")
        from tl_deploy.runtime.tensorrt_backend import load_engine

        return load_engine(path, device=gpu_index(device, gpu_only=True))
    raise ArtifactError(f"Unknown model file type {path.name!r}: expected .onnx or .engine.")


def _load_openvino(path: Path, backend: str, *, precision: str, providers: Sequence[str] | None,
                   threads: int | None, device: str | None, streams: int = 1) -> Classifier:
    """An ONNX file on OpenVINO's CPU plugin; options that only other backends have are refused."""
    if backend not in ("auto", "openvino"):
        raise TlDeployError(f"precision='bf16' is computed by OpenVINO only, not backend={backend!r}: pass "
                            "backend='openvino' (or 'auto').")
    if providers is not None:
        raise TlDeployError("providers= are onnxruntime options; OpenVINO takes none: drop them.")
    if device not in (None, "cpu"):
        raise BackendUnavailableError(f"OpenVINO runs on the CPU here, not device={device!r}: pass device='cpu', "
                                      "or use backend='onnxruntime' or 'tensorrt' for a GPU.")
    from tl_deploy.runtime.openvino_backend import load_openvino

    return load_openvino(path, precision="bf16" if precision == "bf16" else "auto", threads=threads,
                         streams=streams)
