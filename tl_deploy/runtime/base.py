"""One small interface for every backend, with one lifecycle (after Polygraphy's ``BaseRunner``).

A ``Runner`` turns a batch in the graph's native layout into an output array; it knows nothing
about images or class names (that is the ``Classifier``'s job, ``runtime.classifier``).

Lifecycle: ``__init__`` stores settings only and acquires nothing; ``activate()`` acquires the
session, engine or device memory; ``deactivate()`` (alias ``close()``) releases it. The public
``infer()`` is a template method: it checks that the runner is active, validates the batch against
the runner's ``input_spec()`` (dtype, rank, fixed dimensions, batch within limits), times the call
(``last_inference_time()``) and only then calls the subclass's ``_infer_impl``. Runners are context
managers, and a runner dropped while still active says so with a ``ResourceWarning`` (like an
unclosed file) and releases what it holds. numpy only.
"""

from __future__ import annotations

import abc
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from tl_deploy.errors import DataError, TlDeployError
from tl_deploy.formats.names import FLOAT_NCHW

_logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class InputSpec:
    """What a runner's one input accepts: its name, dtype and shape (None: any size on that axis)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]  # (N, ...) with N the batch axis

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} {self.dtype} ({dims})"


def batch_problem(batch: Any, spec: InputSpec | None, *, max_batch: int | None = None) -> str | None:
    """Why ``batch`` cannot go to a runner with input ``spec`` and these batch limits, or None (pure)."""
    if not isinstance(batch, np.ndarray):
        return f"a numpy array is needed, got {type(batch).__name__}"
    if batch.ndim == 0 or batch.shape[0] < 1:
        return f"an empty batch (shape {batch.shape})"
    n = int(batch.shape[0])
    if max_batch is not None and n > max_batch:
        return f"batch {n} is over the runner's maximum {max_batch}: split it into batches of at most {max_batch}"
    if spec is None:
        return None
    if batch.dtype != spec.dtype:
        return f"dtype {batch.dtype}, but input {spec.describe()} takes {spec.dtype}"
    if batch.ndim != len(spec.shape):
        return f"shape {batch.shape} has {batch.ndim} dimensions, but input {spec.describe()} has {len(spec.shape)}"
    wrong = [(axis, got, want) for axis, (got, want) in enumerate(zip(batch.shape, spec.shape))
             if axis > 0 and want is not None and got != want]
    if wrong:
        axis, got, want = wrong[0]
        return f"shape {batch.shape} has {got} on axis {axis}, but input {spec.describe()} needs {want}"
    return None


class Runner(abc.ABC):
    """Runs one model on one backend: native input batch -> float32 output (N, ...), usually logits.

    Subclasses write ``_activate_impl``, ``_infer_impl``, ``_deactivate_impl`` and (optionally)
    ``input_spec``; callers use ``activate``/``infer``/``deactivate`` or a ``with`` block.
    """

    backend_name: str = "runner"  # "torch", "onnxruntime", "openvino", "tensorrt"
    precision: str = "fp32"  # "fp32", "fp16", "int8", or "bf16" (what OpenVINO computes an FP32 file in)
    input_layout: str = FLOAT_NCHW  # float32_nchw or uint8_nhwc
    thread_safe: bool = True  # may infer() be called concurrently?
    streams: int = 1  # infer() calls that compute at once, each on its share of the threads (load(streams=))
    max_batch: int | None = None  # largest batch one call accepts (None: any)
    device: str = "cpu"  # where it runs, for humans ("cpu", "cuda:0", ...)
    is_active: bool = False  # between activate() and deactivate()
    _last_time: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def activate(self) -> None:
        """Acquire what inference needs (session, engine, device memory); a second call does nothing."""
        if self.is_active:
            _logger.debug("%r is already active", self)
            return
        self._activate_impl()
        self.is_active = True

    def deactivate(self) -> None:
        """Release what ``activate`` acquired; a runner that is not active is left as it is."""
        if not self.is_active:
            return
        try:
            self._deactivate_impl()
        finally:
            self.is_active = False

    def close(self) -> None:
        """The same as ``deactivate``: release sessions, contexts and device buffers."""
        self.deactivate()

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def __del__(self) -> None:
        if not getattr(self, "is_active", False):
            return
        try:
            warnings.warn(f"{self!r} was activated but never deactivated: call close() or use a with block.",
                          ResourceWarning, stacklevel=2)
            self.deactivate()
        except Exception:  # interpreter shutdown: the backend may already be gone
            pass

    # ------------------------------------------------------------------ inference
    def input_spec(self) -> InputSpec | None:
        """The one input's name, dtype and shape (valid once active); None: not checked here."""
        return None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 or (N, H, W, 3) uint8 (any array ``input_spec`` accepts) -> (N, ...) float32."""
        if not self.is_active:
            raise TlDeployError(f"{self!r} is not active: call activate() first, or use it in a with block.")
        problem = batch_problem(batch, self.input_spec(), max_batch=self.max_batch)
        if problem:
            raise DataError(f"{self!r} cannot run this batch: {problem}.")
        start = time.perf_counter()
        out = self._infer_impl(batch)
        self._last_time = time.perf_counter() - start
        return out

    def last_inference_time(self) -> float | None:
        """Seconds the last ``infer`` spent in the backend (without the input checks); None before any."""
        return self._last_time

    # ------------------------------------------------------------------ what subclasses write
    @abc.abstractmethod
    def _activate_impl(self) -> None:
        """Acquire the backend's resources."""

    @abc.abstractmethod
    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        """Run a checked batch."""

    def _deactivate_impl(self) -> None:  # noqa: B027  (optional hook: some runners hold nothing to release)
        """Release the backend's resources."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend_name}, {self.precision}, {self.device})"
