"""What this machine offers for GPU inference: GPU indices, CUDA, TensorRT, onnxruntime's GPU providers.

Probes only: nothing here builds or loads a model. Heavy modules (tensorrt, cuda-python, torch,
onnxruntime) are imported inside the function that asks about them, so importing this module is free.
"""

from __future__ import annotations

import re
from typing import Any

from tl_deploy.errors import BackendUnavailableError, TlDeployError

INSTALL_HINT = (
    "pip install 'tl_deploy[trt]' (TensorRT 10 or 11 and cuda-python from PyPI; needs an NVIDIA driver)"
)


def gpu_index(device: str | None, *, gpu_only: bool = False) -> int:
    """The GPU index of a torch-style device name (pure): ``cuda:1`` -> 1; ``cuda`` and None -> 0.

    ``cpu`` -> 0 too (the GPU providers are then simply not used), unless ``gpu_only`` (a TensorRT
    engine runs on a GPU): then only ``cuda`` / ``cuda:N`` are accepted.
    """
    if device is None or device == "cuda" or (device == "cpu" and not gpu_only):
        return 0
    head, _, index = device.partition(":")
    if head != "cuda" or not index.isdigit():
        if gpu_only:
            raise BackendUnavailableError(f"Invalid device {device!r} for a TensorRT engine: use cuda or cuda:N "
                                          "(N = GPU index).")
        raise BackendUnavailableError(f"Invalid device {device!r}: use cpu, cuda or cuda:N.")
    return int(index)


def import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[attr-defined,no-redef]

        return cudart
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT backend needs cuda-python, which is not installed: {INSTALL_HINT}."
        ) from exc


def cuda_check(result: Any) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple, raising on any error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TlDeployError(f"CUDA call failed: {err}. Check the GPU with nvidia-smi.")
    return values[0] if len(values) == 1 else tuple(values)


def require_tensorrt() -> None:
    """Check that TensorRT, cuda-python and a CUDA GPU are all present.

    Raises ``BackendUnavailableError`` (exit code 2) naming the first missing piece and how to
    install it. A ``tensorrt`` folder holding only type stubs does not count as TensorRT.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not installed (import tensorrt failed): {INSTALL_HINT}.") from exc
    if not hasattr(trt, "Builder"):
        raise BackendUnavailableError(
            f"TensorRT is not installed (only the 'tensorrt' type stubs were found): {INSTALL_HINT}."
        )
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise BackendUnavailableError(
            f"No CUDA GPU is usable ({err}): TensorRT needs an NVIDIA GPU and driver; "
            "run on a GPU machine or use the onnxruntime backend."
        )


def set_device(device: int) -> Any:
    """Make GPU ``device`` current for this thread (TensorRT builds and runs on the current device);
    returns the cudart module. Refuses an index this machine does not have."""
    cudart = import_cudart()
    count = cuda_check(cudart.cudaGetDeviceCount())
    if not 0 <= device < int(count):
        raise BackendUnavailableError(
            f"Invalid CUDA device {device}: this machine has {count} GPU(s), numbered 0..{int(count) - 1}."
        )
    cuda_check(cudart.cudaSetDevice(device))
    return cudart


def current_environment(device: int = 0) -> dict[str, str]:
    """TensorRT version and identity of GPU ``device`` (what a sidecar is checked against)."""
    require_tensorrt()
    import tensorrt as trt

    cudart = import_cudart()
    props = cuda_check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt": str(trt.__version__),
        "gpu": name.rstrip("\x00").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
    }


ORT_MIN_FOR_TENSORRT_11 = (1, 27)  # first onnxruntime whose TensorRT execution provider links TensorRT 11


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) if parts else (0, 0)


def ort_tensorrt_problem(ort_version: str, tensorrt_version: str | None) -> str | None:
    """Why onnxruntime's TensorRT execution provider cannot work with this TensorRT, or None (pure)."""
    if tensorrt_version is None or _major_minor(tensorrt_version)[0] < 11:
        return None
    if _major_minor(ort_version) >= ORT_MIN_FOR_TENSORRT_11:
        return None
    need = ".".join(map(str, ORT_MIN_FOR_TENSORRT_11))
    return (f"onnxruntime's TensorRT execution provider needs onnxruntime >= {need} for TensorRT 11; this machine "
            f"has onnxruntime {ort_version} with TensorRT {tensorrt_version}: pip install 'onnxruntime-gpu>={need}', "
            "or pip install 'tensorrt<11', or run the .engine file with the native TensorRT backend")


def check_ort_tensorrt_versions() -> None:
    """Refuse onnxruntime's TensorRT provider when the installed versions do not fit together."""
    import onnxruntime as ort

    try:
        import tensorrt as trt

        tensorrt_version: str | None = str(trt.__version__)
    except (ImportError, AttributeError):  # the provider reports a missing TensorRT itself
        tensorrt_version = None
    problem = ort_tensorrt_problem(str(ort.__version__), tensorrt_version)
    if problem:
        raise BackendUnavailableError(f"{problem}.")


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    try:
        require_tensorrt()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def tensorrt_available() -> bool:
    """True when TensorRT, cuda-python and a CUDA GPU are all present."""
    return tensorrt_problem() is None


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return None


def ort_gpu_available() -> bool:
    """Whether onnxruntime's build has the CUDA provider; ``load`` checks that a session really gets it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()
