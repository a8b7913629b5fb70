"""The classifier on top of any runner: the model's preprocessing, class names and top-k results.

A ``Classifier`` owns a runner (``runtime.base``) plus the model's metadata and does the
artifact's own preprocessing (``tl_deploy.preprocess``), so every backend sees exactly the same
input. numpy + Pillow only.

Thread safety: ``Classifier.predict``/``infer`` may be called from several threads when
``runner.thread_safe`` is true (onnxruntime: ``InferenceSession.run`` is thread-safe; OpenVINO: one
infer request per concurrent call, from a pool; torch: eval mode under ``inference_mode``, every
forward pass on the runner's one inference thread). The
TensorRT runner owns one execution context and CUDA buffers, so it serialises calls with a lock
(correct, not parallel): create one classifier per thread to run engines concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Union

import numpy as np

from tl_deploy.errors import ArtifactError, DataError
from tl_deploy.formats.metadata import OnnxMetadata, graph_problems
from tl_deploy.formats.names import FLOAT_NCHW, UINT8_NHWC
from tl_deploy.preprocess import ImageInput, denormalize, prepare, prepare_uint8
from tl_deploy.runtime.base import Runner

_logger = logging.getLogger(__name__)

Images = Union[ImageInput, Sequence[ImageInput]]
DEFAULT_CHUNK = 64  # images per runner call when the backend sets no limit


class GraphRunner(Protocol):
    """A runner of an ONNX graph that can show the file's ``metadata_props`` and its input/output signature."""

    def custom_metadata(self) -> dict[str, str]: ...

    def io_signature(self) -> tuple[list[tuple[str, str, list[Any]]], list[tuple[str, str, list[Any]]]]: ...


def checked_metadata(runner: GraphRunner, path: Path) -> OnnxMetadata:
    """The tl_deploy metadata of the ONNX file an active ``runner`` holds, refused unless it is there and
    matches the graph (one image input, one logits output)."""
    metadata = OnnxMetadata.from_props(runner.custom_metadata(), origin=str(path))
    problems = graph_problems(metadata, *runner.io_signature())
    if problems:
        raise ArtifactError(f"{path} does not match its own metadata: {'; '.join(problems)}. Re-export it.")
    return metadata


class Prediction(NamedTuple):
    """Top-k labels and probabilities for each image: ``labels[i][j]`` goes with ``probabilities[i, j]``."""

    labels: list[list[str]]  # (N, k) class names, most likely first
    probabilities: np.ndarray  # (N, k) float32 softmax probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stability, returned as float32."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)  # (N, C)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _as_list(images: Images) -> list[ImageInput]:
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]  # (N, H, W, C) is a batch of images
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]  # type: ignore[list-item]


class Classifier:
    """An image classifier on any backend, with the artifact's preprocessing and class names."""

    def __init__(self, runner: Runner, metadata: OnnxMetadata, source: Path) -> None:
        """Activates ``runner`` (unless it already is); ``close()`` or the ``with`` block deactivates it."""
        if not runner.is_active:
            runner.activate()
        if runner.input_layout != metadata.input_layout:
            runner.deactivate()
            raise DataError(
                f"Runner expects {runner.input_layout} but the metadata says {metadata.input_layout}."
            )
        self.runner = runner
        self.metadata = metadata
        self.source = source  # the file or folder the model was loaded from

    # The facts callers usually want, flat.
    @property
    def backend_name(self) -> str:
        return self.runner.backend_name

    @property
    def precision(self) -> str:
        return self.runner.precision

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def streams(self) -> int:
        """``infer`` calls that compute at once (``load(streams=)``); 1 for most runners."""
        return self.runner.streams

    @property
    def thread_safe(self) -> bool:
        return self.runner.thread_safe

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    @property
    def spec(self):  # type: ignore[no-untyped-def]
        return self.metadata.spec

    def __repr__(self) -> str:
        return (f"Classifier({self.source}, backend={self.backend_name}, precision={self.precision}, "
                f"device={self.device}, classes={len(self.class_names)})")

    def preprocess(self, images: Images) -> np.ndarray:
        """Images -> the runner's native batch: (N, 3, H, W) float32 or (N, H, W, 3) uint8."""
        items = _as_list(images)
        if not items:
            raise DataError("No images given: pass a path, PIL image, array, or a list of them.")
        convert = prepare if self.runner.input_layout == FLOAT_NCHW else prepare_uint8
        return np.stack([convert(item, self.metadata.spec) for item in items])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32, preprocessed like ``preprocess.prepare`` -> (N, C) float32 logits.

        For a baked-preprocess graph the batch is turned back into uint8 pixels first (exact for
        inputs that came from ``prepare``).
        """
        size = self.metadata.spec.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or batch.dtype != np.float32:
            raise DataError(
                f"infer() takes a (N, 3, {size}, {size}) float32 batch, got {batch.shape} {batch.dtype}."
            )
        if self.runner.input_layout == UINT8_NHWC:
            batch = np.stack([denormalize(x, self.metadata.spec) for x in batch])  # (N, H, W, 3)
        return self._run(batch)

    def _run(self, native: np.ndarray) -> np.ndarray:
        chunk = self.runner.max_batch or DEFAULT_CHUNK
        if len(native) <= chunk:
            logits = self.runner.infer(np.ascontiguousarray(native))
        else:
            logits = np.concatenate([self.runner.infer(np.ascontiguousarray(native[i:i + chunk]))
                                     for i in range(0, len(native), chunk)])
        want = (len(native), len(self.metadata.class_names))
        if logits.shape != want:  # a graph with symbolic output dimensions is only checked here
            raise ArtifactError(f"{self.source} returned logits of shape {logits.shape} for {want[0]} image(s), "
                                f"but its metadata lists {want[1]} classes: expected {want}. Re-export it.")
        return logits

    def predict_proba(self, images: Images) -> np.ndarray:
        """Images -> (N, C) class probabilities."""
        return softmax(self._run(self.preprocess(images)))

    def predict(self, images: Images, top_k: int = 1) -> Prediction:
        """Top-k labels and probabilities for one image or a list of images (always batch-shaped)."""
        self._check_top_k(top_k)
        return self.rank(self.predict_proba(images), top_k)

    def predict_each(self, images: Images, top_k: int = 1) -> list[Prediction | DataError]:
        """Like ``predict``, but an image that cannot be read costs only its own result: one entry
        per image, a one-image ``Prediction`` or the ``DataError`` that says what is wrong with it."""
        self._check_top_k(top_k)
        items = _as_list(images)
        convert = prepare if self.runner.input_layout == FLOAT_NCHW else prepare_uint8
        errors: dict[int, DataError] = {}
        arrays: list[np.ndarray] = []
        for i, item in enumerate(items):
            try:
                arrays.append(convert(item, self.metadata.spec))
            except DataError as exc:
                errors[i] = exc
        batch = self.rank(softmax(self._run(np.stack(arrays))), top_k) if arrays else None
        out: list[Prediction | DataError] = []
        row = 0
        for i in range(len(items)):
            if i in errors or batch is None:
                out.append(errors[i])
                continue
            out.append(Prediction(labels=[batch.labels[row]], probabilities=batch.probabilities[row:row + 1]))
            row += 1
        return out

    def _check_top_k(self, top_k: int) -> None:
        num_classes = len(self.metadata.class_names)
        if not 1 <= top_k <= num_classes:
            raise DataError(f"Invalid top_k {top_k}: choose 1..{num_classes} (the number of classes).")

    def rank(self, probs: np.ndarray, top_k: int) -> Prediction:
        """The ``top_k`` classes of each row of (N, C) probabilities, most probable first (ties: lower index)."""
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]  # (N, k)
        labels = [[self.metadata.class_names[j] for j in row] for row in order]
        return Prediction(labels=labels, probabilities=np.take_along_axis(probs, order, axis=1))

    def close(self) -> None:
        """Deactivate the runner: release its session, engine and device memory."""
        self.runner.deactivate()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
