"""onnxruntime backend: CPU everywhere; CUDA / TensorRT execution providers with onnxruntime-gpu.

Imports only numpy, Pillow and onnxruntime (never torch), so edge code can install just those.
``OnnxRuntimeRunner`` runs any ONNX graph with one input (a tl_deploy export, or a plain graph such
as a backbone prefix); ``load_onnx`` is the loader of tl_deploy files: the class names and the
preprocessing come from the file's own metadata, checked against its graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.errors import ArtifactError, BackendUnavailableError
from tl_deploy.formats.names import FLOAT_NCHW, UINT8_NHWC
from tl_deploy.runtime.base import InputSpec, Runner, usable_cpus
from tl_deploy.runtime.classifier import Classifier, checked_metadata

_logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider",)  # TensorrtExecutionProvider only when asked: it builds for minutes
DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")  # the ones that run on a GPU
# Distributions that install the same ``onnxruntime`` module: two of them overwrite each other's files.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn")
GPU_SWAP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
# onnxruntime's type strings -> numpy dtypes, for the input check
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
              "tensor(double)": np.float64}


def default_providers(available: Sequence[str]) -> list[str]:
    """CUDA when onnxruntime-gpu offers it, then CPU (pure; ``available`` from ort.get_available_providers())."""
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


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
    """An ``InferenceSession`` on one ONNX graph with one input. Thread-safe: onnxruntime documents
    ``run`` as safe to call concurrently. Needs no tl_deploy metadata (the loader checks that)."""

    backend_name = "onnxruntime"
    thread_safe = True

    def __init__(self, source: str | Path | bytes, *, providers: Sequence[str] | None = None, device_id: int = 0,
                 threads: int | None = None, optimize: bool = True, spin: bool = True, streams: int = 1) -> None:
        """``source``: an ONNX file, or a serialized graph in memory. ``providers`` None: CUDA when
        onnxruntime-gpu has it (falling back to CPU with a warning when the session cannot create it),
        then CPU; named providers must all be created or activation fails. ``device_id``: the GPU the
        CUDA/TensorRT providers run on. ``optimize=False`` runs the graph as written (Q/DQ not fused:
        the integer arithmetic TensorRT performs for a QDQ file); ``spin=False`` keeps idle worker
        threads from busy-waiting, so they do not steal cores from other work timed in the same process.
        ``streams``: calls meant to run at once on the CPU (``streams`` from ``Runner``): each gets
        ``threads // streams`` (at least 1) of the ``threads`` (None: every CPU), since concurrent
        ``run`` calls share the session's one intra-op pool. A session on a GPU keeps one stream.
        Stores the settings only: ``activate()`` creates the session."""
        if device_id < 0:
            raise BackendUnavailableError(f"Invalid GPU index {device_id}: choose 0 or more.")
        if threads is not None and threads < 1:
            raise BackendUnavailableError(f"Invalid threads={threads}: choose 1 or more.")
        if streams < 1:
            raise BackendUnavailableError(f"Invalid streams={streams}: choose 1 or more.")
        self.source = source if isinstance(source, bytes) else Path(source)
        self.name = "in-memory graph" if isinstance(source, bytes) else Path(source).name
        self._asked = list(providers) if providers is not None else None
        self._device_id, self._threads, self._optimize, self._spin = device_id, threads, optimize, spin
        self._streams = streams
        self.providers: list[str] = []
        self.session: Any = None

    def _activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime.") from exc
        if isinstance(self.source, Path) and not self.source.is_file():
            raise ArtifactError(f"ONNX file not found: {self.source}.")
        chosen = self._providers(ort.get_available_providers())
        streams = self._streams if chosen[0] not in DEVICE_PROVIDERS else 1
        try:
            session = ort.InferenceSession(self.source if isinstance(self.source, bytes) else str(self.source),
                                           self._session_options(ort, streams), providers=chosen,
                                           provider_options=provider_options(chosen, self._device_id))
        except Exception as exc:  # onnxruntime raises its own exception types
            where = self.source if isinstance(self.source, Path) else self.name
            raise ArtifactError(f"onnxruntime cannot load {where}: {str(exc).splitlines()[0][:300]}") from exc
        # What the session really got: a provider in the build can still fail to start (missing CUDA
        # libraries, two onnxruntime distributions), and onnxruntime then quietly runs on the CPU.
        self.providers = session.get_providers()
        lost = [p for p in chosen if p in DEVICE_PROVIDERS and p not in self.providers]
        if lost:
            reason = gpu_unavailable_reason(chosen, self.providers)
            if self._asked is not None:
                raise BackendUnavailableError(f"onnxruntime could not start {lost} for {self.name}: {reason}.")
            _logger.warning("onnxruntime runs %s on the CPU: %s", self.name, reason)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        self.session = session
        self._input = inputs[0].name if inputs else ""
        self._output = outputs[0].name if outputs else ""
        self._spec = _input_spec(inputs[0]) if len(inputs) == 1 else None
        self.input_layout = UINT8_NHWC if inputs and inputs[0].type == "tensor(uint8)" else FLOAT_NCHW
        self.device = f"cuda:{self._device_id}" if self.providers[0] in DEVICE_PROVIDERS else "cpu"
        self.streams = streams  # 1 on a device provider, and when one was asked for but lost

    def _providers(self, available: Sequence[str]) -> list[str]:
        """The providers to ask the session for, refused when the build lacks one."""
        chosen = list(self._asked) if self._asked is not None else default_providers(available)
        missing = [p for p in chosen if p not in available]
        if missing:
            conflict = distribution_conflict(installed_distributions())
            raise BackendUnavailableError(
                f"onnxruntime providers {missing} are not available (have {list(available)}): "
                + (conflict + "." if conflict else f"for CUDA/TensorRT: {GPU_SWAP}; or leave providers unset.")
            )
        return chosen

    def _session_options(self, ort: Any, streams: int = 1) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self._optimize else \
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if not self._spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if streams > 1:
            options.intra_op_num_threads = max(1, (self._threads or usable_cpus()) // streams)
        elif self._threads is not None:
            options.intra_op_num_threads = self._threads
        options.log_severity_level = 3  # errors only; warnings about unused initializers are noise
        return options

    def input_spec(self) -> InputSpec | None:
        return self._spec

    def io_signature(self) -> tuple[list[tuple[str, str, list[Any]]], list[tuple[str, str, list[Any]]]]:
        """(inputs, outputs) of the active session as (name, onnxruntime type, shape), for ``graph_problems``."""
        return ([(a.name, a.type, list(a.shape)) for a in self.session.get_inputs()],
                [(a.name, a.type, list(a.shape)) for a in self.session.get_outputs()])

    def custom_metadata(self) -> dict[str, str]:
        """The graph's ``metadata_props`` (where tl_deploy files keep their ``OnnxMetadata``)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self._output], {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def _deactivate_impl(self) -> None:
        self.session = None


def _input_spec(arg: Any) -> InputSpec | None:
    """An onnxruntime ``NodeArg`` -> ``InputSpec``; None for an input type not checked here."""
    dtype = ORT_DTYPES.get(arg.type)
    if dtype is None:
        return None
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return InputSpec(arg.name, np.dtype(dtype), shape)


def load_onnx(path: Path, *, providers: Sequence[str] | None = None, device_id: int = 0, threads: int | None = None,
              optimize: bool = True, spin: bool = True, streams: int = 1) -> Classifier:
    """An ``.onnx`` file written by tl_deploy -> classifier on onnxruntime (options: ``OnnxRuntimeRunner``).

    The file's metadata must be there and match its graph (one image input, one logits output)."""
    runner = OnnxRuntimeRunner(path, providers=providers, device_id=device_id, threads=threads, optimize=optimize,
                               spin=spin, streams=streams)
    runner.activate()
    try:
        metadata = checked_metadata(runner, path)
    except BaseException:
        runner.deactivate()
        raise
    runner.precision = metadata.precision
    _logger.info("onnxruntime: %s on %s", path.name, ", ".join(runner.providers))
    return Classifier(runner, metadata, path)
