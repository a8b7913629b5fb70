"""An export folder as a Triton Inference Server model repository (``export ... --triton DIR``).

One Triton model per exported file, named ``<run>-<variant>``::

    DIR/<run>-fp32/config.pbtxt        backend onnxruntime, model.onnx
    DIR/<run>-fp32/1/model.onnx
    DIR/<run>-fp32/labels.txt          the class names, one a line, in logit order
    DIR/<run>-int8/...                 model.int8.onnx (QDQ); <run>-int8-cpu: model.int8.cpu.onnx
    DIR/<run>-fp32-uint8/...           model.preprocess.onnx: clients send uint8 NHWC images
    DIR/<run>-trt-fp32/1/model.plan    backend tensorrt, for each engine of the export
    DIR/tl_deploy_triton.json          marks the repository as tl_deploy's (Triton indexes subfolders only)

Names, dtypes and dims come from the ONNX graph (the batch dimension dropped); ``max_batch_size``
from the engine's optimization profile, or for ONNX files from the export's TensorRT profile when
the batch dimension is dynamic. The preprocessing spec goes into each config's ``parameters``. The
repository is built under a temporary name next to DIR and renamed into place, so a half-written
one is never left behind. Needs the ``onnx`` package (read the graphs), not tritonclient.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_deploy.errors import ArtifactError, OutputError
from tl_deploy.fileio import atomic_dir, atomic_write_json, atomic_write_text, check_output_writable, read_json
from tl_deploy.formats.engine_sidecar import read_sidecar
from tl_deploy.formats.export_manifest import export_file, listed_files, read_export_manifest
from tl_deploy.formats.metadata import OnnxMetadata
from tl_deploy.formats.names import (
    BAKED_FILE,
    ENGINE_SUFFIXES,
    FP16_FILE,
    FP32_FILE,
    INT8_CPU_FILE,
    INT8_FILE,
    ONNX_SUFFIX,
    UINT8_NHWC,
)

_logger = logging.getLogger(__name__)

REPOSITORY_MARKER = "tl_deploy_triton.json"  # its presence makes a folder a repository tl_deploy wrote
REPOSITORY_FORMAT = "tl_deploy.triton"
LABELS_FILE = "labels.txt"
# Triton's default model file name per backend (default_model_filename): model.onnx, model.plan
SERVED_FILES = {"onnxruntime": f"model{ONNX_SUFFIX}", "tensorrt": "model.plan"}
MODEL_VERSION = "1"  # Triton serves numbered version folders; an export is one version
DEFAULT_MAX_BATCH = 32  # the export's default TensorRT profile max, when the manifest records none
MAX_QUEUE_DELAY_US = 1000  # dynamic batching waits at most 1 ms to fill a batch

# Variant suffix of the Triton model name for each ONNX file of an export folder.
ONNX_VARIANTS = {FP32_FILE: "fp32", BAKED_FILE: "fp32-uint8", FP16_FILE: "fp16", INT8_FILE: "int8",
                 INT8_CPU_FILE: "int8-cpu"}
# ONNX TensorProto element types -> Triton data types (the ones an exported classifier can have).
TRITON_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64",
                 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: dims without the batch dimension."""

    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass(frozen=True)
class TritonModel:
    """One model of the repository: where its file comes from and what its config says."""

    name: str  # Triton model name, <run>-<variant>
    source: str  # file name inside the export folder
    backend: str  # "onnxruntime" or "tensorrt"
    model_file: str  # Triton's default file name for the backend (SERVED_FILES)
    max_batch_size: int  # 0: the graph has a fixed batch dimension, no batching by Triton
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: OnnxMetadata
    kind: str = "KIND_AUTO"  # instance_group kind: the CPU-tuned INT8 file runs on CPU instances


def model_name(run: str, variant: str) -> str:
    """``<run>-<variant>``, with characters Triton's repository paths do not like replaced by ``_``."""
    return _NAME_OK.sub("_", f"{run}-{variant}")


def graph_tensors(path: Path) -> tuple[int | None, list[TensorSpec], list[TensorSpec]]:
    """(fixed batch size or None when dynamic, inputs, outputs) of an ONNX file, dims without the batch."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises protobuf's DecodeError and others for a damaged file
        raise ArtifactError(f"Cannot read the ONNX graph {path}: {exc}. Re-run the export.") from exc
    initializers = {t.name for t in graph.initializer}
    batch: int | None = None

    def spec(value: Any, role: str) -> TensorSpec:
        nonlocal batch
        tensor = value.type.tensor_type
        dtype = TRITON_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise ArtifactError(f"{path.name}: {role} {value.name!r} has ONNX element type {tensor.elem_type}, "
                                "which no Triton data type matches. Re-export the model.")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        if not dims:
            raise ArtifactError(f"{path.name}: {role} {value.name!r} has no batch dimension. Re-export the model.")
        if dims[0] > 0:
            batch = dims[0]
        return TensorSpec(value.name, dtype, tuple(dims[1:]))

    inputs = [spec(v, "input") for v in graph.input if v.name not in initializers]
    outputs = [spec(v, "output") for v in graph.output]
    return batch, inputs, outputs


def _profile_max(manifest: Mapping[str, Any]) -> int:
    """The TensorRT profile max the export recorded (``options.batch`` = MIN:OPT:MAX), else the default."""
    text = str((manifest.get("options") or {}).get("batch", ""))
    parts = text.split(":")
    try:
        return int(parts[-1]) if parts[-1] else DEFAULT_MAX_BATCH
    except ValueError:
        return DEFAULT_MAX_BATCH


def plan_repository(export_dir: Path, manifest: Mapping[str, Any], run: str, *,
                    verify: bool = True) -> list[TritonModel]:
    """The Triton models an export folder gives (pure but for reading its graphs and engine sidecars).

    ``verify``: each file is checked against its sha256 in export.json before it is read."""
    metadata = OnnxMetadata.from_dict(manifest.get("metadata") or {}, origin=f"{export_dir}/export.json")
    entries = [f for f in listed_files(manifest) if f.get("status") == "ok"]
    by_name = {str(f["file"]): f for f in entries}
    models = []
    for entry in entries:
        name = str(entry["file"])
        if name in ONNX_VARIANTS:
            batch, inputs, outputs = graph_tensors(export_file(export_dir, name, manifest, verify=verify))
            layout = str(entry.get("input_layout", metadata.input_layout))
            models.append(TritonModel(
                name=model_name(run, ONNX_VARIANTS[name]), source=name, backend="onnxruntime",
                model_file=SERVED_FILES["onnxruntime"], max_batch_size=0 if batch else _profile_max(manifest),
                inputs=tuple(inputs) if batch is None else _with_batch(inputs, batch),
                outputs=tuple(outputs) if batch is None else _with_batch(outputs, batch),
                metadata=metadata.replace(input_layout=layout, precision=str(entry.get("precision", "fp32"))),
                kind="KIND_CPU" if name == INT8_CPU_FILE else "KIND_AUTO"))
        elif name.endswith(ENGINE_SUFFIXES):
            source = str(entry.get("source", FP32_FILE))
            if source not in by_name:
                raise ArtifactError(f"{export_dir}/export.json: engine {name} names its source {source!r}, which "
                                    "the export does not list. Re-run the export with --trt.")
            _, inputs, outputs = graph_tensors(export_file(export_dir, source, manifest, verify=verify))
            profile = read_sidecar(export_file(export_dir, name, manifest, verify=verify)).get("profile") or {}
            precision = str(entry.get("precision", "fp32"))
            models.append(TritonModel(
                name=model_name(run, f"trt-{precision}"), source=name, backend="tensorrt",
                model_file=SERVED_FILES["tensorrt"], max_batch_size=int(profile.get("max", _profile_max(manifest))),
                inputs=tuple(inputs), outputs=tuple(outputs), metadata=metadata.replace(precision=precision),
                kind="KIND_GPU"))
    if not models:
        raise ArtifactError(f"{export_dir} lists no exported ONNX file or engine. Re-run the export.")
    return models


def _with_batch(tensors: Sequence[TensorSpec], batch: int) -> tuple[TensorSpec, ...]:
    """A graph with a fixed batch: Triton gets max_batch_size 0 and the full shape, batch included."""
    return tuple(TensorSpec(t.name, t.data_type, (batch, *t.dims)) for t in tensors)


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def model_parameters(model: TritonModel) -> dict[str, str]:
    """The config's ``parameters``: how a client turns an image into the input tensor, and provenance."""
    spec = model.metadata.spec
    return {
        "tl_deploy.input_layout": model.metadata.input_layout,
        "tl_deploy.precision": model.metadata.precision,
        "tl_deploy.input_size": str(spec.input_size),
        "tl_deploy.resize": str(spec.resize),
        "tl_deploy.interpolation": spec.interpolation,
        "tl_deploy.mean": json.dumps(list(spec.mean)),
        "tl_deploy.std": json.dumps(list(spec.std)),
        "tl_deploy.channel_order": spec.channel_order,
        # the layout the client sends: NCHW float normalised by mean/std, or NHWC uint8 for a baked graph
        "tl_deploy.layout": "NHWC" if model.metadata.input_layout == UINT8_NHWC else spec.layout,
        "tl_deploy.preprocess": json.dumps(spec.to_dict(), sort_keys=True),
        "tl_deploy.architecture": model.metadata.architecture,
        "tl_deploy.source_checksum": model.metadata.source_checksum,
    }


def config_pbtxt(model: TritonModel) -> str:
    """The ``config.pbtxt`` of one model (protobuf text format of Triton's ``ModelConfig``)."""
    lines = [f"name: {_quote(model.name)}", f"backend: {_quote(model.backend)}",
             f"max_batch_size: {model.max_batch_size}"]

    def tensor(kind: str, spec: TensorSpec, labels: bool) -> None:
        lines.append(f"{kind} [")
        lines.append("  {")
        lines.append(f"    name: {_quote(spec.name)}")
        lines.append(f"    data_type: {spec.data_type}")
        lines.append(f"    dims: [ {', '.join(str(d) for d in spec.dims)} ]")
        if labels:
            lines.append(f"    label_filename: {_quote(LABELS_FILE)}")
        lines.append("  }")
        lines.append("]")

    for spec in model.inputs:
        tensor("input", spec, labels=False)
    for spec in model.outputs:
        tensor("output", spec, labels=True)
    if model.max_batch_size > 0:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}", "}"]
    lines += ["instance_group [", f"  {{ count: 1, kind: {model.kind} }}", "]"]
    for key, value in model_parameters(model).items():
        lines += ["parameters {", f"  key: {_quote(key)}", f"  value: {{ string_value: {_quote(value)} }}", "}"]
    return "\n".join(lines) + "\n"


def _copy(source: Path, dest: Path) -> None:
    """A copy, not a hardlink: the repository's file modes are set when it is moved into place, and a
    shared inode would change the export's file too (and an edit of either would change both)."""
    shutil.copyfile(source, dest)


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def check_repository_dir(out: Path, export_dir: Path, *, force: bool) -> None:
    """Refuse ``out`` unless it is new, empty, or (with ``force``) a repository tl_deploy wrote."""
    dest, src = _resolved(out), _resolved(export_dir)
    if dest == src or src in dest.parents or dest in src.parents:
        raise OutputError(f"--triton {out} overlaps the export folder {export_dir}: choose a folder outside it.")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"--triton {out} is a file, not a folder: choose a new folder.")
    check_output_writable(out, option="--triton")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    if not is_repository(dest):
        raise OutputError(f"--triton {out} is a non-empty folder that holds no Triton repository written by "
                          f"tl_deploy (no {REPOSITORY_MARKER}): choose a new or empty folder.")
    if not force:
        raise OutputError(f"--triton {out} already holds a Triton repository: pass --force to replace it, "
                          "or choose another folder.")


def is_repository(folder: Path) -> bool:
    """Whether ``folder`` holds a Triton repository that tl_deploy wrote (its marker file)."""
    try:
        doc = read_json(folder / REPOSITORY_MARKER)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == REPOSITORY_FORMAT


def write_triton_repository(export_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                            force: bool = False, verify: bool = True) -> list[TritonModel]:
    """Write the Triton model repository of ``export_dir`` at ``out``, atomically; return its models.

    Every file is checked against its sha256 in export.json before it is read (``verify``).
    """
    export_dir, out = Path(export_dir), Path(out)
    check_repository_dir(out, export_dir, force=force)
    manifest = read_export_manifest(export_dir)
    run = _resolved(export_dir).name
    models = plan_repository(export_dir, manifest, run, verify=verify)
    labels = "".join(f"{name}\n" for name in models[0].metadata.class_names)
    with atomic_dir(out) as tmp:
        for model in models:
            folder = tmp / model.name
            (folder / MODEL_VERSION).mkdir(parents=True)
            source = export_file(export_dir, model.source, manifest, verify=False)  # verified by the plan
            _copy(source, folder / MODEL_VERSION / model.model_file)
            atomic_write_text(folder / "config.pbtxt", config_pbtxt(model))
            atomic_write_text(folder / LABELS_FILE, labels)
        atomic_write_json(tmp / REPOSITORY_MARKER, {
            "format": REPOSITORY_FORMAT, "format_version": 1, "export": str(export_dir),
            "models": {m.name: m.source for m in models},
        })
    _logger.debug("wrote Triton model repository %s (%s)", out, ", ".join(m.name for m in models))
    return models


def export_is_current(model_dir: Path, export_dir: Path, files: Sequence[str], options: Mapping[str, Any]) -> bool:
    """Whether ``export_dir`` already holds what an export of ``model_dir`` would write: exported from
    this very artifact (its manifest.json checksum), with ``options`` (opset, exporter) as recorded and
    every file of ``files`` listed as ok. Then ``--triton`` reuses it instead of exporting again."""
    from tl_deploy.fileio import sha256_file
    from tl_deploy.formats.names import ARTIFACT_MANIFEST

    try:
        manifest = read_export_manifest(export_dir)
        checksum = sha256_file(model_dir / ARTIFACT_MANIFEST)
    except (ArtifactError, OSError):
        return False
    recorded = manifest.get("options") or {}
    ok = {f.get("file") for f in listed_files(manifest) if f.get("status") == "ok"}
    return ((manifest.get("source") or {}).get("checksum") == checksum
            and all(recorded.get(key) == value for key, value in options.items())
            and all(name in ok for name in files))
