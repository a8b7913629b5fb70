"""What an exported file says about itself: class names, preprocessing, provenance.

Every ONNX file we write carries an ``OnnxMetadata`` in its ``metadata_props`` (string key/value
pairs, readable with ``onnx`` or with ``onnxruntime``'s ``get_modelmeta()``), so the file alone is
enough to classify an image the way the artifact does. TensorRT engines carry the same dict in their
JSON sidecar. This module needs only the standard library, numpy and Pillow (via ``preprocess``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tl_deploy import __version__
from tl_deploy.errors import ArtifactError, DataError
from tl_deploy.fileio import parse_json
from tl_deploy.formats.names import FLOAT_NCHW, INPUT_LAYOUTS, PRECISIONS
from tl_deploy.preprocess import PreprocessSpec

FORMAT = "tl_deploy.onnx"
FORMAT_VERSION = 1
PREFIX = "tl_deploy."


@dataclass(frozen=True)
class OnnxMetadata:
    """The artifact facts an exported model needs to be used on its own."""

    class_names: tuple[str, ...]  # index -> label, the order of the logits
    spec: PreprocessSpec  # how an image becomes the input tensor
    source_checksum: str  # sha256 of the source artifact's manifest.json
    architecture: str  # timm model name, for humans and reports
    input_layout: str = FLOAT_NCHW  # what the graph's single input expects
    precision: str = "fp32"  # numeric precision of the weights / engine
    quantization: dict[str, Any] = field(default_factory=dict)  # INT8 choices, empty for float
    tl_deploy_version: str = __version__  # the tl_deploy that wrote the file

    def __post_init__(self) -> None:
        if self.input_layout not in INPUT_LAYOUTS:
            raise ArtifactError(
                f"Invalid input layout {self.input_layout!r}. Only {', '.join(INPUT_LAYOUTS)} exist."
            )
        if self.precision not in PRECISIONS:
            raise ArtifactError(f"Invalid precision {self.precision!r}. Only {', '.join(PRECISIONS)} exist.")

    def replace(self, **changes: Any) -> OnnxMetadata:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "preprocess": self.spec.to_dict(),
            "source_checksum": self.source_checksum,
            "architecture": self.architecture,
            "input_layout": self.input_layout,
            "precision": self.precision,
            "quantization": dict(self.quantization),
            "tl_deploy_version": self.tl_deploy_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "metadata") -> OnnxMetadata:
        if data.get("format") != FORMAT:
            raise ArtifactError(
                f"{origin} has no tl_deploy metadata (format {data.get('format')!r}): export it with "
                "python -m tl_deploy.export, or load the artifact folder instead."
            )
        version = data.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(
                f"{origin} uses export format {version!r}, not one this tl_deploy understands "
                f"(up to {FORMAT_VERSION}). Upgrade tl_deploy, or re-export."
            )
        names = data.get("class_names")
        problem = class_names_problem(names)
        if problem:
            raise ArtifactError(f"Invalid tl_deploy metadata in {origin}: {problem}. Re-export it.")
        try:
            return cls(
                class_names=tuple(names),  # type: ignore[arg-type]  # checked just above
                spec=PreprocessSpec.from_dict(data["preprocess"]),
                source_checksum=str(data["source_checksum"]),
                architecture=str(data["architecture"]),
                input_layout=str(data.get("input_layout", FLOAT_NCHW)),
                precision=str(data.get("precision", "fp32")),
                quantization=dict(data.get("quantization") or {}),
                tl_deploy_version=str(data.get("tl_deploy_version", "unknown")),
            )
        except (KeyError, TypeError, ValueError, DataError) as exc:
            raise ArtifactError(f"Invalid tl_deploy metadata in {origin}: {exc}.") from exc

    def to_props(self) -> dict[str, str]:
        """Flat string pairs for ONNX ``metadata_props`` (JSON for structured values)."""
        return {PREFIX + key: value if isinstance(value, str) else json.dumps(value)
                for key, value in self.to_dict().items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], origin: str = "ONNX file") -> OnnxMetadata:
        """Inverse of ``to_props``; ``props`` may hold unrelated keys too."""
        data: dict[str, Any] = {}
        for key, raw in props.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):]
            if name in ("format", "source_checksum", "architecture", "input_layout", "precision",
                        "tl_deploy_version"):
                data[name] = raw
                continue
            try:
                data[name] = parse_json(raw, f"metadata {key!r} of {origin}")
            except ValueError as exc:
                raise ArtifactError(f"Corrupt metadata {key!r} in {origin}: {exc}.") from exc
        return cls.from_dict(data, origin)


def class_names_problem(names: Any) -> str | None:
    """Why ``names`` is not a usable class list (a JSON list of 2+ unique, non-empty strings), or None."""
    if not isinstance(names, list):
        return f"class_names must be a list of strings, got {type(names).__name__} {str(names)[:80]!r}"
    if not all(isinstance(n, str) and n for n in names):
        bad = next(n for n in names if not (isinstance(n, str) and n))
        return f"class_names must be non-empty strings, got {bad!r}"
    if len(names) < 2:
        return f"class_names lists {len(names)} class(es); a classifier needs at least 2"
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        return f"class_names repeats {dupes}: each class needs its own name"
    return None


def graph_problems(metadata: OnnxMetadata, inputs: Sequence[tuple[str, str, Sequence[Any]]],
                   outputs: Sequence[tuple[str, str, Sequence[Any]]]) -> list[str]:
    """What a graph's inputs and outputs say differently from its metadata (pure).

    ``inputs``/``outputs``: (name, onnxruntime type such as ``tensor(float)``, shape with ints for fixed
    dimensions and strings or None for symbolic ones).
    """
    size, classes = metadata.spec.input_size, len(metadata.class_names)
    problems = []
    if len(inputs) != 1:
        problems.append(f"{len(inputs)} inputs ({', '.join(n for n, _, _ in inputs)}); a tl_deploy classifier "
                        "takes one image batch")
    else:
        name, dtype, shape = inputs[0]
        if metadata.input_layout == FLOAT_NCHW:
            want_type, want_shape, layout = "tensor(float)", (3, size, size), "(N, 3, H, W) float32"
        else:
            want_type, want_shape, layout = "tensor(uint8)", (size, size, 3), "(N, H, W, 3) uint8"
        fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
        if dtype != want_type or len(shape) != 4 or any(
                got is not None and got != want for got, want in zip(fixed[1:], want_shape)):
            problems.append(f"input {name!r} is {dtype} {list(shape)}, but the metadata (input_layout "
                            f"{metadata.input_layout}, input_size {size}) asks for {layout} with H = W = {size}")
    if len(outputs) != 1:
        problems.append(f"{len(outputs)} outputs ({', '.join(n for n, _, _ in outputs)}); a tl_deploy "
                        "classifier gives one (N, num_classes) logits tensor")
    else:
        name, dtype, shape = outputs[0]
        width = shape[1] if len(shape) == 2 else None
        if dtype not in ("tensor(float)", "tensor(float16)") or len(shape) != 2 or \
                (isinstance(width, int) and width != classes):
            problems.append(f"output {name!r} is {dtype} {list(shape)}, but the metadata lists {classes} class "
                            f"names: expected (N, {classes}) float logits")
    return problems


def embed_metadata(model: Any, metadata: OnnxMetadata) -> None:
    """Write ``metadata`` into an ``onnx.ModelProto``'s metadata_props (our keys replaced, others kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in [*keep, *metadata.to_props().items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(path: str) -> OnnxMetadata:
    """Read the metadata of an ONNX file without loading its weights (needs the ``onnx`` package)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return OnnxMetadata.from_props({p.key: p.value for p in model.metadata_props}, origin=path)
