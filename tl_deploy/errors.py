"""One error hierarchy: every expected failure is a ``TlDeployError`` with a message that says
what failed, the offending value, and what to do about it."""

from __future__ import annotations


class TlDeployError(Exception):
    """Base class of every error tl_deploy raises on purpose (bad input, missing dependency...)."""

    exit_code: int = 1


class DataError(TlDeployError):
    """The dataset or an image is missing, malformed or unreadable."""


class ModelError(TlDeployError):
    """Unknown model name, weights that do not fit, or an unusable checkpoint."""


class ArtifactError(TlDeployError):
    """A model artifact or export on disk is missing, incomplete, tampered with or foreign."""


class ExportError(TlDeployError):
    """A conversion (ONNX, quantization, TensorRT) failed."""


class OutputError(TlDeployError):
    """The output folder cannot be written: permissions, a read-only file system, or a full disk."""


class BackendUnavailableError(TlDeployError):
    """An optional runtime (TensorRT, CUDA, onnxruntime-gpu) is not installed or has no device."""

    exit_code = 2


class UsageError(TlDeployError):
    """Options that cannot work together, or one that does nothing in the combination asked for."""

    exit_code = 2
