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


def default_providers(available: Sequence[str]) -> list[str]:
    """CUDA when onnxruntime-gpu offers it, then CPU (pure; ``available`` from ort.get_available_providers())."""
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    """An ``InferenceSession``. Thread-safe: onnxruntime documents ``run`` as safe to call concurrently."""

    backend_name = "onnxruntime"
    thread_safe = True

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None, optimize: bool = True, spin: bool = True) -> None:
        """``optimize=False`` runs the graph as written (Q/DQ not fused: the integer arithmetic TensorRT
        performs for a QDQ file); ``spin=False`` keeps idle worker threads from busy-waiting, so
        they do not steal cores from other work timed in the same process."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime.") from exc
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"ONNX file not found: {path}.")
        available = ort.get_available_providers()
        chosen = list(providers) if providers is not None else default_providers(available)
        missing = [p for p in chosen if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime providers {missing} are not available (have {available}): "
                "pip install onnxruntime-gpu for CUDA/TensorRT, or leave providers unset."
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
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:300]}") from exc
        self.metadata = OnnxMetadata.from_props(self.session.get_modelmeta().custom_metadata_map,
                                                origin=str(path))
        problems = graph_problems(self.metadata,
                                  [(a.name, a.type, list(a.shape)) for a in self.session.get_inputs()],
                                  [(a.name, a.type, list(a.shape)) for a in self.session.get_outputs()])
        if problems:
            raise ArtifactError(f"{path} does not match its own metadata: {'; '.join(problems)}. Re-export it.")
        self.precision = self.metadata.precision
        self.input_layout = self.metadata.input_layout
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] in ("CUDAExecutionProvider",
                                                      "TensorrtExecutionProvider") else "cpu"
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self._output], {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)


def load_onnx(path: Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
              optimize: bool = True, spin: bool = True) -> Classifier:
    """An ``.onnx`` file written by tl_deploy -> classifier on onnxruntime (options: ``OnnxRuntimeRunner``)."""
    runner = OnnxRuntimeRunner(path, providers=providers, threads=threads, optimize=optimize, spin=spin)
    _logger.info("onnxruntime: %s on %s", path.name, ", ".join(runner.providers))
    return Classifier(runner, runner.metadata, path)
