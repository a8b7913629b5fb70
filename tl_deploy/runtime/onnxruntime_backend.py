"""onnxruntime backend: CPU everywhere; CUDA / TensorRT execution providers with onnxruntime-gpu.

Imports only numpy, Pillow and onnxruntime (never torch), so edge code can install just those. The
class names and preprocessing come from the ONNX file's own metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tl_deploy.errors import ArtifactError, BackendUnavailableError
from tl_deploy.export.metadata import OnnxMetadata, graph_problems
from tl_deploy.runtime.base import Classifier, Runner

_logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider",)  # TensorrtExecutionProvider only when asked: it builds for minutes
DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # the ones that run on a GPU
# Distributions that install the same ``onnxruntime`` module: two of them overwrite each other's files.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn")
GPU_SWAP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


def default_providers(available: Sequence[str]) -> list[str]:
    """CUDA when onnxruntime-gpu offers it, then CPU (pure; ``available`` from ort.get_available_providers())."""
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


def gpu_index(device: str | None) -> int:
    """The GPU index of a torch-style device name (pure): ``cuda:1`` -> 1; ``cuda``, ``cpu``, None -> 0."""
    if device is None or not device.startswith("cuda:"):
        return 0
    index = device.removeprefix("cuda:")
    if not index.isdigit():
        raise BackendUnavailableError(f"Invalid device {device!r}: use cpu, cuda or cuda:N.")
    return int(index)


def provider_options(providers: Sequence[str], device_id: int = 0) -> list[dict[str, str]]:
    """Each provider's options (pure): the GPU providers run on GPU ``device_id``; CUDA with TF32 off,
    because onnxruntime's default (``use_tf32`` 1) rounds FP32 convolutions and matmuls to TF32's 10-bit
    mantissa and misses the 1e-3 logit parity FP32 files are held to."""
    options: list[dict[str, str]] = []
    for name in providers:
        if name == "CUDAExecutionProvider":
            options.append({"device_id": str(device_id), "use_tf32": "0"})
        elif name == "TensorrtExecutionProvider":
            options.append({"device_id": str(device_id)})
        else:
            options.append({})
    return options


def installed_distributions() -> list[str]:
    """The installed distributions of ``ORT_DISTRIBUTIONS``."""
    from importlib import metadata

    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def distribution_conflict(installed: Sequence[str]) -> str | None:
    """Why two onnxruntime distributions side by side break it, and the fix; None with one (pure)."""
    if len(installed) < 2:
        return None
    return (f"{' and '.join(installed)} are both installed; they own the same onnxruntime module, so one "
            f"overwrote the other's files and the CUDA provider may be gone. Keep one: pip uninstall -y "
            f"{' '.join(installed)} && pip install onnxruntime-gpu (or onnxruntime for CPU only)")


def gpu_unavailable_reason(asked: Sequence[str], got: Sequence[str]) -> str:
    """Why a session did not get the GPU providers it asked for: what onnxruntime can say from here."""
    conflict = distribution_conflict(installed_distributions())
    if conflict:
        return conflict
    return (f"the session asked for {list(asked)} and got {list(got)}: onnxruntime-gpu is installed but could "
            "not load its CUDA/cuDNN libraries (see onnxruntime's CUDA requirements for its version), or the "
            "GPU index does not exist")


class OnnxRuntimeRunner(Runner):
    """An ``InferenceSession``. Thread-safe: onnxruntime documents ``run`` as safe to call concurrently."""

    backend_name = "onnxruntime"
    thread_safe = True

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None, device_id: int = 0,
                 threads: int | None = None, optimize: bool = True, spin: bool = True) -> None:
        """``providers`` None: CUDA when onnxruntime-gpu has it (falling back to CPU with a warning when
        the session cannot create it), then CPU; named providers must all be created or it fails.
        ``device_id``: the GPU the CUDA/TensorRT providers run on. ``optimize=False`` runs the graph as
        written (Q/DQ not fused: the integer arithmetic TensorRT performs for a QDQ file);
        ``spin=False`` keeps idle worker threads from busy-waiting, so they do not steal cores from other
        work timed in the same process."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime.") from exc
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"ONNX file not found: {path}.")
        if device_id < 0:
            raise BackendUnavailableError(f"Invalid GPU index {device_id}: choose 0 or more.")
        available = ort.get_available_providers()
        chosen = list(providers) if providers is not None else default_providers(available)
        missing = [p for p in chosen if p not in available]
        if missing:
            conflict = distribution_conflict(installed_distributions())
            raise BackendUnavailableError(
                f"onnxruntime providers {missing} are not available (have {available}): "
                + (conflict + "." if conflict else f"for CUDA/TensorRT: {GPU_SWAP}; or leave providers unset.")
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            if threads < 1:
                raise BackendUnavailableError(f"Invalid threads={threads}: choose 1 or more.")
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only; warnings about unused initializers are noise
        try:
            self.session = ort.InferenceSession(str(path), options, providers=chosen,
                                                provider_options=provider_options(chosen, device_id))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:300]}") from exc
        # What the session really got: a provider in the build can still fail to start (missing CUDA
        # libraries, two onnxruntime distributions), and onnxruntime then quietly runs on the CPU.
        self.providers = self.session.get_providers()
        lost = [p for p in chosen if p in DEVICE_PROVIDERS and p not in self.providers]
        if lost:
            reason = gpu_unavailable_reason(chosen, self.providers)
            if providers is not None:
                raise BackendUnavailableError(f"onnxruntime could not start {lost} for {path.name}: {reason}.")
            _logger.warning("onnxruntime runs %s on the CPU: %s", path.name, reason)
        self.metadata = OnnxMetadata.from_props(self.session.get_modelmeta().custom_metadata_map,
                                                origin=str(path))
        problems = graph_problems(self.metadata,
                                  [(a.name, a.type, list(a.shape)) for a in self.session.get_inputs()],
                                  [(a.name, a.type, list(a.shape)) for a in self.session.get_outputs()])
        if problems:
            raise ArtifactError(f"{path} does not match its own metadata: {'; '.join(problems)}. Re-export it.")
        self.precision = self.metadata.precision
        self.input_layout = self.metadata.input_layout
        on_gpu = self.providers[0] in DEVICE_PROVIDERS
        self.device = f"cuda:{device_id}" if on_gpu else "cpu"
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self._output], {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)


def load_onnx(path: Path, *, providers: Sequence[str] | None = None, device_id: int = 0, threads: int | None = None,
              optimize: bool = True, spin: bool = True) -> Classifier:
    """An ``.onnx`` file written by tl_deploy -> classifier on onnxruntime (options: ``OnnxRuntimeRunner``)."""
    runner = OnnxRuntimeRunner(path, providers=providers, device_id=device_id, threads=threads, optimize=optimize,
                               spin=spin)
    _logger.info("onnxruntime: %s on %s", path.name, ", ".join(runner.providers))
    return Classifier(runner, runner.metadata, path)
