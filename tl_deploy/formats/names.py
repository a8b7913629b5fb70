"""Names that files written by one part of tl_deploy and read by another must agree on.

Pure constants (and small functions of them): file names in a model artifact and an export
folder, the tensor names of the exported graphs, the input layouts and the precision names.
"""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------- input layouts and precisions
FLOAT_NCHW = "float32_nchw"  # (N, 3, H, W) float32, normalised by the PreprocessSpec
UINT8_NHWC = "uint8_nhwc"  # (N, H, W, 3) uint8 RGB, resized and cropped; the graph normalises
INPUT_LAYOUTS = (FLOAT_NCHW, UINT8_NHWC)
PRECISIONS = ("fp32", "fp16", "int8")  # numeric precision of an exported file or engine
# What a runtime computes in: a file's own precision, or bf16 (OpenVINO computing an FP32 file on a CPU with bf16)
COMPUTE_PRECISIONS = (*PRECISIONS, "bf16")

# ---------------------------------------------------------------- tensor names of exported graphs
INPUT_NAME = "input"  # float32 (N, 3, H, W)
IMAGE_INPUT_NAME = "image"  # uint8 (N, H, W, 3), baked-preprocess graphs
OUTPUT_NAME = "logits"  # float32 (N, num_classes)

# ---------------------------------------------------------------- a model artifact folder
ARTIFACT_WEIGHTS = "model.safetensors"
ARTIFACT_CONFIG = "config.json"  # its presence makes a folder a model artifact
ARTIFACT_METRICS = "metrics.json"
ARTIFACT_MANIFEST = "manifest.json"  # sha256 of every other file

# ---------------------------------------------------------------- an export folder
EXPORT_MANIFEST = "export.json"  # its presence makes a folder an export folder
FP32_FILE = "model.onnx"
FP16_FILE = "model.fp16.onnx"  # float16 weights and compute, float32 I/O: onnxruntime and TensorRT FP16
BAKED_FILE = "model.preprocess.onnx"  # uint8 NHWC input, normalisation inside the graph
INT8_FILE = "model.int8.onnx"  # QDQ, symmetric: TensorRT explicit quantization (runs on onnxruntime too)
INT8_CPU_FILE = "model.int8.cpu.onnx"  # tuned for onnxruntime on x86 CPUs
ONNX_SUFFIX = ".onnx"
ENGINE_SUFFIXES = (".engine", ".plan")  # serialized TensorRT engines


def engine_file(precision: str) -> str:
    """The file name of a TensorRT engine: ``model.<precision>.engine``."""
    return f"model.{precision}.engine"



def parity_report_paths(export_dir: Path, split: str) -> tuple[Path, Path]:
    """``export/<run>.parity-<split>.json`` and ``.md``: next to the export folder, not inside it."""
    folder = export_dir if export_dir.name not in ("", ".", "..") else export_dir.resolve()
    stem = folder.parent / f"{folder.name}.parity-{split}"
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"
