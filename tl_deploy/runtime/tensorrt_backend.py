"""Native TensorRT backend: a deserialized engine, CUDA buffers, dynamic batch within its profile.

The engine's sidecar is read once and checked first (TensorRT version, GPU, sha256), so a foreign
or modified engine is refused with a message saying how to rebuild, instead of failing deep inside
TensorRT. One execution context and one set of device buffers per runner, on the GPU it was given
(``device``, made current in every call: CUDA's current device is per thread); calls are
serialised with a lock. Everything is acquired in ``activate()`` and released in ``deactivate()``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.errors import ArtifactError, DataError
from tl_deploy.fileio import sha256_file
from tl_deploy.formats.engine_sidecar import check_sidecar, read_sidecar
from tl_deploy.formats.metadata import OnnxMetadata, graph_problems
from tl_deploy.runtime.base import InputSpec, Runner
from tl_deploy.runtime.classifier import Classifier
from tl_deploy.runtime.gpu import cuda_check, current_environment, require_tensorrt, set_device

_logger = logging.getLogger(__name__)

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "uint8": "tensor(uint8)"}


class TensorRTRunner(Runner):
    """A TensorRT engine. Not parallel: one context per runner, calls serialised by a lock.

    ``metadata`` (the model facts from the sidecar) and ``precision`` are set by ``activate()``.
    """

    backend_name = "tensorrt"
    thread_safe = True  # safe through the lock; use one runner per thread for concurrency

    def __init__(self, engine_path: str | Path, *, device: int = 0) -> None:
        self.path = Path(engine_path)
        self._device_index = device
        self.metadata: OnnxMetadata | None = None
        self.min_batch = 1
        self._lock = threading.Lock()
        self._context: Any = None
        self._engine: Any = None
        self._spec: InputSpec | None = None

    def _activate_impl(self) -> None:
        require_tensorrt()
        path = self.path
        if not path.is_file():
            raise ArtifactError(f"Engine file not found: {path}.")
        self._cudart = set_device(self._device_index)
        sidecar = read_sidecar(path)  # once: the metadata and the precision both come from it
        self.metadata = check_sidecar(sidecar, current_environment(self._device_index),
                                      engine_sha256=sha256_file(path), engine_name=str(path))
        self.precision = str(sidecar["precision"])
        self.input_layout = self.metadata.input_layout
        self._load_engine()
        try:
            self._allocate()
        except BaseException:
            self._engine = self._context = None
            raise

    def _load_engine(self) -> None:
        """Deserialize the engine and name its one input and output."""
        import tensorrt as trt  # typed by tensorrt-stubs

        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ArtifactError(
                f"TensorRT could not deserialize {self.path} although its sidecar matches this machine; "
                "rebuild it with python -m tl_deploy.export MODEL_DIR --trt."
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"{self.path} has inputs {inputs} and outputs {outputs}; expected one of each.")
        self._engine = engine
        self._input, self._output = inputs[0], outputs[0]
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output)))

    def _allocate(self) -> None:
        """Check the engine against its metadata, then one context, device buffers and a stream."""
        engine, metadata, cudart = self._engine, self.metadata, self._cudart
        assert metadata is not None  # set by _activate_impl just before
        low, _opt, high = engine.get_tensor_profile_shape(self._input, 0)
        self.min_batch, self.profile_max = int(low[0]), int(high[0])
        self.max_batch = self.profile_max
        problems = graph_problems(metadata, *([(n, _ONNX_TYPES.get(dtype.name, dtype.name),
                                                [int(d) for d in engine.get_tensor_shape(n)[:]])]
                                              for n, dtype in ((self._input, self._in_dtype),
                                                               (self._output, self._out_dtype))))
        if problems:  # the output buffer below is sized from the metadata: a mismatch must stop here
            raise ArtifactError(f"{self.path} does not match its sidecar metadata: {'; '.join(problems)}. "
                                "Rebuild it.")
        in_shape = (self.profile_max, *high[1:])  # Dims[slice] -> tuple
        self._spec = InputSpec(self._input, self._in_dtype, (None, *(int(d) for d in high[1:])))
        self._in_bytes = int(np.prod(in_shape)) * self._in_dtype.itemsize
        self._out_bytes = self.profile_max * len(metadata.class_names) * self._out_dtype.itemsize
        self._context = engine.create_execution_context()
        self._d_in = cuda_check(cudart.cudaMalloc(self._in_bytes))
        self._d_out = cuda_check(cudart.cudaMalloc(self._out_bytes))
        self._stream = cuda_check(cudart.cudaStreamCreate())
        self._context.set_tensor_address(self._input, int(self._d_in))
        self._context.set_tensor_address(self._output, int(self._d_out))
        props = cuda_check(cudart.cudaGetDeviceProperties(self._device_index))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        self.device = f"cuda:{self._device_index} ({name.rstrip(chr(0)).strip()})"

    def input_spec(self) -> InputSpec | None:
        return self._spec

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        n = int(batch.shape[0])
        if n < self.min_batch:  # pad up to the profile's minimum, then drop the padding
            pad = np.repeat(batch[-1:], self.min_batch - n, axis=0)
            return self._infer_impl(np.concatenate([batch, pad]))[:n]
        if n > self.profile_max:
            raise DataError(f"Batch {n} is over the engine's profile maximum {self.profile_max}.")
        cudart = self._cudart
        host_in = np.ascontiguousarray(batch, dtype=self._in_dtype)
        with self._lock:
            if self._context is None:
                raise ArtifactError("This TensorRT runner was closed.")
            cuda_check(cudart.cudaSetDevice(self._device_index))  # this thread may have another current GPU
            if not self._context.set_input_shape(self._input, host_in.shape):
                raise DataError(f"Engine refused input shape {host_in.shape}.")
            out_shape: tuple[int, ...] = self._context.get_tensor_shape(self._output)[:]
            host_out = np.empty(out_shape, dtype=self._out_dtype)
            h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            cuda_check(cudart.cudaMemcpyAsync(self._d_in, host_in.ctypes.data, host_in.nbytes, h2d, self._stream))
            if not self._context.execute_async_v3(int(self._stream)):
                raise ArtifactError("TensorRT execute_async_v3 failed; see the TensorRT log.")
            cuda_check(cudart.cudaMemcpyAsync(host_out.ctypes.data, self._d_out, host_out.nbytes, d2h, self._stream))
            cuda_check(cudart.cudaStreamSynchronize(self._stream))
        return host_out.astype(np.float32)

    def _deactivate_impl(self) -> None:
        with self._lock:
            if self._context is None:
                return
            self._context = None
            cudart: Any = self._cudart
            cudart.cudaSetDevice(self._device_index)
            cudart.cudaFree(self._d_in)
            cudart.cudaFree(self._d_out)
            cudart.cudaStreamDestroy(self._stream)
            self._engine = None


def load_engine(path: Path, *, device: int = 0) -> Classifier:
    """A ``.engine`` file (with its sidecar) -> classifier on native TensorRT, on GPU ``device``."""
    runner = TensorRTRunner(path, device=device)
    runner.activate()
    assert runner.metadata is not None  # set by activate
    _logger.info("tensorrt: %s (%s) on %s", path.name, runner.precision, runner.device)
    return Classifier(runner, runner.metadata, path)

