"""The named backends of a model artifact and its export folder, for reports that compare them.

==================  =========================================================================
``torch``           the artifact's PyTorch module, eager (the reference)
``torch-cudagraph`` the same module replayed from CUDA graphs (CUDA only)
``onnx-fp32``       ``model.onnx`` on onnxruntime
``onnx-fp32-uint8`` ``model.preprocess.onnx``: uint8 pixels in, normalisation inside the graph
``onnx-fp16``       ``model.fp16.onnx``: float16 weights and compute, float32 I/O (CPU or CUDA)
``onnx-int8``       ``model.int8.cpu.onnx``: INT8 tuned for onnxruntime on CPUs
``onnx-int8-qdq``   ``model.int8.onnx`` run as written (Q/DQ not fused): the integer arithmetic a
                    TensorRT INT8 engine performs, so its accuracy can be checked without a GPU
``trt-fp32`` ...    TensorRT engines ``model.<precision>.engine``
``openvino-fp32``   ``model.onnx`` on OpenVINO's CPU plugin, strict FP32 (``INFERENCE_PRECISION_HINT`` f32)
``openvino-bf16``   ``model.onnx`` on OpenVINO computed in bf16 (CPUs with native bf16 only)
``openvino-fp16``   ``model.fp16.onnx`` on OpenVINO (FP16 weights, computed in FP32 on the CPU)
``openvino-int8``   ``model.int8.onnx``, the QDQ file, on OpenVINO's INT8 kernels
==================  =========================================================================

``resolve_backends`` is pure: it says, for each asked-for name, which file runs it or why it
cannot run here, so no backend is ever dropped silently. ``open_backend`` loads one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_deploy.errors import TlDeployError
from tl_deploy.formats.export_manifest import export_file, read_export_manifest
from tl_deploy.formats.names import UINT8_NHWC
from tl_deploy.runtime.classifier import Classifier
from tl_deploy.runtime.gpu import gpu_index

# name -> (precision, the export options that write its file)
EXPORT_BACKENDS: dict[str, tuple[str, str]] = {
    "onnx-fp32": ("fp32", ""),
    "onnx-fp32-uint8": ("fp32", "--bake-preprocess"),
    "onnx-fp16": ("fp16", "--fp16"),
    "onnx-int8": ("int8", "--int8"),
    "onnx-int8-qdq": ("int8", "--int8"),
    "trt-fp32": ("fp32", "--trt"),
    "trt-fp16": ("fp16", "--trt --fp16"),
    "trt-int8": ("int8", "--trt --int8"),
    "openvino-fp32": ("fp32", ""),
    "openvino-bf16": ("bf16", ""),
    "openvino-fp16": ("fp16", "--fp16"),
    "openvino-int8": ("int8", "--int8"),
}
# OpenVINO reads the same ONNX files: its backend name -> the onnxruntime backend whose file it runs
OPENVINO_FILES = {"openvino-fp32": "onnx-fp32", "openvino-bf16": "onnx-fp32", "openvino-fp16": "onnx-fp16",
                  "openvino-int8": "onnx-int8-qdq"}
TORCH_BACKENDS = ("torch", "torch-cudagraph")
BACKEND_NAMES = (*TORCH_BACKENDS, *EXPORT_BACKENDS)


@dataclass(frozen=True)
class BackendChoice:
    """One named backend: the file that runs it, or why it cannot run here."""

    name: str
    precision: str  # fp32, fp16, int8, or bf16 (openvino-bf16 computing the FP32 file)
    file: str | None = None  # file in the export folder; None for the torch backends
    skip_reason: str = ""  # empty when it can run

    @property
    def runnable(self) -> bool:
        return not self.skip_reason


def export_backend_name(entry: Mapping[str, Any]) -> str:
    """The backend name of one ``export.json`` file entry."""
    precision = str(entry.get("precision"))
    if entry.get("kind") == "engine":
        return f"trt-{precision}"
    if precision == "int8":
        return "onnx-int8" if entry.get("target") == "cpu" else "onnx-int8-qdq"
    return "onnx-fp32-uint8" if entry.get("input_layout") == UINT8_NHWC else f"onnx-{precision}"


def parse_backends(values: Sequence[str]) -> list[str]:
    """``["onnx-fp32,onnx-int8", "torch"]`` -> unique names in order; unknown names are refused."""
    names: list[str] = []
    for value in values:
        for name in (part.strip() for part in value.split(",")):
            if not name:
                continue
            if name not in BACKEND_NAMES:
                raise TlDeployError(f"Invalid backend {name!r}. Only {', '.join(BACKEND_NAMES)} exist.")
            if name not in names:
                names.append(name)
    if not names:
        raise TlDeployError(f"No backend given: choose from {', '.join(BACKEND_NAMES)}.")
    return names


def resolve_backends(names: Sequence[str], files: Sequence[Mapping[str, Any]], *, model_dir: str,
                     tensorrt_problem: str | None, cuda_problem: str | None) -> list[BackendChoice]:
    """For each name, the export file that runs it or the reason it is skipped (pure).

    ``files``: the ``files`` list of export.json. ``tensorrt_problem`` / ``cuda_problem``: why
    TensorRT / a CUDA GPU cannot be used here (None when they can).
    """
    by_name: dict[str, Mapping[str, Any]] = {}
    for entry in files:
        by_name.setdefault(export_backend_name(entry), entry)
    choices = []
    for name in names:
        if name == "torch":
            choices.append(BackendChoice(name, "fp32"))
            continue
        if name == "torch-cudagraph":
            choices.append(BackendChoice(name, "fp32", skip_reason=f"needs CUDA: {cuda_problem}" if cuda_problem
                                         else ""))
            continue
        precision, flags = EXPORT_BACKENDS[name]
        found = by_name.get(OPENVINO_FILES.get(name, name))
        if found is None:
            how = f"python -m tl_deploy.export {model_dir} {flags}".rstrip()
            if name.startswith("trt-"):
                how += " on a machine with TensorRT and a CUDA GPU"
            choices.append(BackendChoice(name, precision,
                                         skip_reason=f"not in the export folder (write it with {how})"))
            continue
        file = str(found["file"])
        if found.get("status", "ok") != "ok":
            reason = f"{file} has export status {found.get('status')!r}"
        elif name.startswith("trt-") and tensorrt_problem:
            reason = f"{file}: {tensorrt_problem}"
        else:
            reason = ""
        choices.append(BackendChoice(name, precision, file, reason))
    return choices


def open_backend(choice: BackendChoice, model_dir: Path, export_dir: Path, *, device: str = "cpu",
                 threads: int | None = None, spin: bool = True, verify: bool = True) -> Classifier:
    """Load a runnable backend through the same checks as ``runtime.load``: the artifact's manifest,
    or the export file's entry in export.json (a plain name in the folder, its sha256 when ``verify``).

    ``device``: torch device; ``threads``: onnxruntime's and OpenVINO's; ``spin``: onnxruntime's.
    """
    if not choice.runnable:
        raise TlDeployError(f"Backend {choice.name} cannot run here: {choice.skip_reason}.")
    if choice.name in TORCH_BACKENDS:
        from tl_deploy.runtime.torch_backend import load_torch

        return load_torch(model_dir, device=device, verify=verify, cuda_graphs=choice.name == "torch-cudagraph")
    if choice.file is None:
        raise TlDeployError(f"Backend {choice.name} names no file of {export_dir}: resolve it with resolve_backends.")
    path = export_file(export_dir, choice.file, read_export_manifest(export_dir), verify=verify)
    if choice.name.startswith("trt-"):
        from tl_deploy.runtime.tensorrt_backend import load_engine

        return load_engine(path, device=gpu_index(device))
    if choice.name in OPENVINO_FILES:
        from tl_deploy.runtime.openvino_backend import load_openvino

        return load_openvino(path, precision="bf16" if choice.precision == "bf16" else "auto", threads=threads)
    from tl_deploy.runtime.onnxruntime_backend import load_onnx

    # The CPU-tuned INT8 file runs where it was tuned for; the others use onnxruntime's default providers.
    providers = ["CPUExecutionProvider"] if choice.name in ("onnx-int8", "onnx-int8-qdq") else None
    return load_onnx(path, providers=providers, device_id=gpu_index(device), threads=threads,
                     optimize=choice.name != "onnx-int8-qdq", spin=spin)
