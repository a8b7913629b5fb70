"""OpenVINO backend: the same exported ONNX files on Intel's CPU runtime (``pip install 'tl_deploy[openvino]'``).

Imports only numpy, Pillow and ``openvino`` (never torch or onnx; ``openvino`` itself only once a runner
activates). OpenVINO reads ONNX directly: ``model.onnx`` (computed in strict FP32, or in bf16 when
asked), the QDQ ``model.int8.onnx`` (INT8 kernels, the rest in FP32) and ``model.fp16.onnx``.

The compute precision is named honestly: left alone, OpenVINO runs an FP32 file in bf16 on CPUs that
have it, so every runner sets ``INFERENCE_PRECISION_HINT`` itself (``f32`` for fp32/int8/fp16 files,
``bf16`` only when bf16 is asked for) and reports what the compiled model really uses.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.errors import ArtifactError, BackendUnavailableError
from tl_deploy.formats.names import FLOAT_NCHW, UINT8_NHWC
from tl_deploy.runtime.base import InputSpec, Runner
from tl_deploy.runtime.classifier import Classifier, checked_metadata

_logger = logging.getLogger(__name__)

INSTALL = "pip install 'tl_deploy[openvino]'"
COMPUTE = ("f32", "bf16")  # INFERENCE_PRECISION_HINT values a runner may ask for
PERFORMANCE_HINT = "LATENCY"  # one stream: one request uses every thread (bench/bench_openvino.py)
# streams > 1 (concurrent requests, predict's default on the CPU): NUM_STREAMS streams share
# INFERENCE_NUM_THREADS, under the THROUGHPUT hint (docs/predict.md measures it)
STREAMS_HINT = "THROUGHPUT"
# A one-image call runs a copy of the graph compiled for batch 1: a static shape let the CPU plugin pick
# faster kernels (model.int8.onnx, 2 threads, AMD EPYC, bench/bench_openvino.py: p50 0.97 / 1.85 ms vs
# 1.07 / 2.05 ms with the batch dimension left dynamic; docs/speed.md). Other batch sizes share the
# dynamic graph, compiled once.
STATIC_BATCH = 1
# OpenVINO element type names -> (onnxruntime-style type string for graph_problems, numpy dtype)
OV_TYPES = {"f32": ("tensor(float)", np.float32), "f16": ("tensor(float16)", np.float16),
            "u8": ("tensor(uint8)", np.uint8), "i8": ("tensor(int8)", np.int8),
            "i32": ("tensor(int32)", np.int32), "i64": ("tensor(int64)", np.int64)}
UNCONVERTED = "No conversion rule found for operations:"  # OpenVINO's line naming the ops it cannot read


def import_openvino() -> Any:
    """The ``openvino`` module, or a ``BackendUnavailableError`` that says how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError(f"OpenVINO is not installed: {INSTALL} (or pip install openvino).") from exc
    return openvino


def openvino_problem() -> str | None:
    """Why the OpenVINO backend cannot run here, or None (it is installed and has a CPU device)."""
    try:
        ov = import_openvino()
        devices = ov.Core().available_devices
    except BackendUnavailableError as exc:
        return str(exc).rstrip(".")
    except RuntimeError as exc:
        return f"OpenVINO cannot start: {str(exc).splitlines()[0][:200]}"
    return None if "CPU" in devices else f"OpenVINO sees no CPU device (devices {devices})"


def cpu_capabilities(core: Any) -> list[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` (``BF16`` where the CPU computes bf16 natively)."""
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def bf16_problem(capabilities: list[str] | tuple[str, ...]) -> str | None:
    """Why bf16 cannot be asked for on a CPU with these ``OPTIMIZATION_CAPABILITIES``, or None (pure)."""
    if "BF16" in capabilities:
        return None
    return (f"this CPU has no native bf16 (OpenVINO's CPU capabilities: {', '.join(capabilities) or 'none'}): "
            "run openvino-fp32, or openvino-int8 for speed")


def read_error(path: Path, exc: Exception) -> Exception:
    """OpenVINO's multi-line read failure -> one line: an op it cannot convert is a missing capability
    (exit 2, other backends keep working); anything else is a broken file."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    ops = [line.split(UNCONVERTED, 1)[1].strip() for line in lines if UNCONVERTED in line]
    if ops:
        return BackendUnavailableError(f"OpenVINO cannot convert operation(s) {', '.join(ops)} of {path.name}: "
                                       "run it with backend='onnxruntime', or upgrade openvino.")
    detail = next((line for line in lines if line.startswith("Unable to read")), lines[-1] if lines else "")
    return ArtifactError(f"OpenVINO cannot read {path}: {detail[:300]}")


class OpenVinoRunner(Runner):
    """One compiled OpenVINO model on the CPU, with one input. Thread-safe: an infer request is not,
    so each concurrent call takes an idle request from a pool (a new one when all are busy) and puts
    it back after the call; the pool grows to the number of callers at once and no further."""

    backend_name = "openvino"
    thread_safe = True

    def __init__(self, source: str | Path, *, compute: str = "f32", threads: int | None = None,
                 force_bf16: bool = False, streams: int = 1) -> None:
        """``source``: an ONNX (or OpenVINO IR ``.xml``) file. ``compute``: ``f32`` (strict: the
        default hint of OpenVINO would be bf16 on CPUs that have it) or ``bf16`` (refused on a CPU
        without native bf16 unless ``force_bf16``, which lets tests run the path anywhere).
        ``threads``: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's choice, every core). ``streams``:
        ``NUM_STREAMS``, requests that compute at once (from as many threads calling ``infer``), sharing
        the threads (``streams`` from ``Runner``, read back from the compiled model). Stores the
        settings only: ``activate()`` compiles the model."""
        if compute not in COMPUTE:
            raise BackendUnavailableError(f"Invalid OpenVINO compute precision {compute!r}: choose "
                                          f"{' or '.join(COMPUTE)}.")
        if threads is not None and threads < 1:
            raise BackendUnavailableError(f"Invalid threads={threads}: choose 1 or more.")
        if streams < 1:
            raise BackendUnavailableError(f"Invalid streams={streams}: choose 1 or more.")
        self.source = Path(source)
        self._compute, self._threads, self._force_bf16 = compute, threads, force_bf16
        self._streams = streams
        self.compute = compute  # what the compiled model computes in, read back from OpenVINO on activate
        self.model: Any = None  # ov.Model as read (its rt_info holds the ONNX metadata_props)
        self.compiled: Any = None
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._spec: InputSpec | None = None
        self._core: Any = None
        self._single: tuple[Any, queue.SimpleQueue[Any]] | None = None  # (compiled for batch 1, its requests)
        self._static_dims: list[int] | None = None  # the input's non-batch dims when a batch-1 copy can be made
        self._single_lock = threading.Lock()

    def _activate_impl(self) -> None:
        ov = import_openvino()
        if not self.source.is_file():
            raise ArtifactError(f"Model file not found: {self.source}.")
        core = self._core = ov.Core()
        if self._compute == "bf16":
            problem = bf16_problem(cpu_capabilities(core))
            if problem and not self._force_bf16:
                raise BackendUnavailableError(f"OpenVINO bf16 for {self.source.name}: {problem}.")
        try:
            self.model = core.read_model(str(self.source))
        except RuntimeError as exc:
            raise read_error(self.source, exc) from exc
        try:
            self.compiled = core.compile_model(self.model, "CPU", self.compile_config())
        except RuntimeError as exc:
            raise BackendUnavailableError(f"OpenVINO cannot compile {self.source.name} for the CPU: "
                                          f"{str(exc).strip().splitlines()[-1][:300]}") from exc
        # What the compiled model computes in, from OpenVINO itself (a hint the CPU cannot honour is dropped).
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
        self.compute = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self._idle = queue.SimpleQueue()
        self._idle.put(self.compiled.create_infer_request())
        inputs = self.model.inputs
        self._static_dims = _static_dims(inputs)
        self._spec = _input_spec(inputs[0]) if len(inputs) == 1 else None
        self.input_layout = UINT8_NHWC if inputs and inputs[0].get_element_type().get_type_name() == "u8" \
            else FLOAT_NCHW
        self.device = "cpu"

    def compile_config(self) -> dict[str, str]:
        """The CPU plugin settings, every one explicit (OpenVINO's defaults differ by CPU and version)."""
        config = {"INFERENCE_PRECISION_HINT": self._compute, "PERFORMANCE_HINT": PERFORMANCE_HINT}
        if self._streams > 1:
            config.update(PERFORMANCE_HINT=STREAMS_HINT, NUM_STREAMS=str(self._streams))
        if self._threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(self._threads)
        return config

    def input_spec(self) -> InputSpec | None:
        return self._spec

    def io_signature(self) -> tuple[list[tuple[str, str, list[Any]]], list[tuple[str, str, list[Any]]]]:
        """(inputs, outputs) as (name, onnxruntime-style type, shape), for ``graph_problems``."""
        return [_signature(p) for p in self.model.inputs], [_signature(p) for p in self.model.outputs]

    def custom_metadata(self) -> dict[str, str]:
        """The ONNX file's ``metadata_props``: OpenVINO keeps them in the model's ``rt_info["framework"]``."""
        rt_info = self.model.get_rt_info()
        if "framework" not in rt_info:
            return {}
        return {str(key): value.astype(str) for key, value in rt_info["framework"].items()}

    def _single_image(self) -> tuple[Any, queue.SimpleQueue[Any]] | None:
        """The graph compiled for ``STATIC_BATCH`` images (on first use), or None when the graph's
        batch dimension is not dynamic or its other dimensions are not all known."""
        single = self._single  # read without the lock: set once, under it
        if single is not None or self._static_dims is None:
            return single
        with self._single_lock:
            if self._single is None:
                model = self.model.clone()
                model.reshape([STATIC_BATCH, *self._static_dims])
                compiled = self._core.compile_model(model, "CPU", self.compile_config())
                self._single = (compiled, queue.SimpleQueue())
            return self._single

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        compiled, idle = self.compiled, self._idle
        if len(batch) == STATIC_BATCH:
            single = self._single_image()
            if single is not None:
                compiled, idle = single
        try:
            request = idle.get_nowait()
        except queue.Empty:  # every request is busy in another thread (or none made yet)
            request = compiled.create_infer_request()
        try:
            # share_inputs: no copy of the batch (the call is synchronous and the batch is not changed)
            request.infer({0: batch}, share_inputs=True)
            out = np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the request reuses it
        finally:
            idle.put(request)
        return out

    def _deactivate_impl(self) -> None:
        self._idle = queue.SimpleQueue()
        self._single = None
        self._static_dims = None
        self.compiled = None
        self.model = None
        self._core = None


def _static_dims(inputs: Any) -> list[int] | None:
    """The non-batch dimensions of the one input when its batch is dynamic and they are all known."""
    shape = inputs[0].get_partial_shape() if len(inputs) == 1 else None
    if shape is None or shape.rank.is_dynamic or not shape[0].is_dynamic:
        return None
    rest = list(shape)[1:]
    return [d.get_length() for d in rest] if all(d.is_static for d in rest) else None


def _signature(port: Any) -> tuple[str, str, list[Any]]:
    type_name = port.get_element_type().get_type_name()
    dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    names = port.get_names()
    return (sorted(names)[0] if names else ""), OV_TYPES.get(type_name, (f"tensor({type_name})",))[0], dims


def _input_spec(port: Any) -> InputSpec | None:
    """An OpenVINO input port -> ``InputSpec``; None for an input type not checked here."""
    name, _, dims = _signature(port)
    known = OV_TYPES.get(port.get_element_type().get_type_name())
    if known is None:
        return None
    return InputSpec(name, np.dtype(known[1]), tuple(dims))


def load_openvino(path: Path, *, precision: str = "auto", threads: int | None = None,
                  force_bf16: bool = False, streams: int = 1) -> Classifier:
    """An ``.onnx`` file written by tl_deploy -> classifier on OpenVINO's CPU plugin.

    ``precision``: ``auto`` (the file's own: fp32, fp16 or int8, computed without bf16), or ``bf16``
    (an FP32 file computed in bf16; see ``OpenVinoRunner`` for ``force_bf16``). The file's metadata
    must be there and match its graph, as ``load_onnx`` checks it."""
    if precision not in ("auto", "bf16"):
        raise BackendUnavailableError(f"Invalid OpenVINO precision {precision!r}: choose auto (the file's own) "
                                      "or bf16.")
    runner = OpenVinoRunner(path, compute="bf16" if precision == "bf16" else "f32", threads=threads,
                            force_bf16=force_bf16, streams=streams)
    runner.activate()
    try:
        metadata = checked_metadata(runner, path)
        if precision == "bf16" and metadata.precision != "fp32":
            raise BackendUnavailableError(f"bf16 computes an FP32 file, but {path.name} is {metadata.precision}: "
                                          "load model.onnx with precision='bf16'.")
    except BaseException:
        runner.deactivate()
        raise
    runner.precision = "bf16" if runner.compute == "bf16" else metadata.precision
    _logger.info("openvino: %s, %s compute, %s threads, %d stream(s)", path.name, runner.compute,
                 threads or "default", runner.streams)
    return Classifier(runner, metadata, path)
