"""What an exported file says about itself: class names, preprocessing, provenance.

Every ONNX file we write carries an ``OnnxMetadata`` in its ``metadata_props`` (string key/value
pairs, readable with ``onnx`` or with ``onnxruntime``'s ``get_modelmeta()``), so the file alone is
enough to classify an image the way the artifact does. TensorRT engines carry the same dict in their
JSON sidecar. This module needs only the standard library, numpy and Pillow (via ``preprocess``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tl_deploy import __version__
from tl_deploy.errors import ArtifactError, DataError
from tl_deploy.fileio import parse_json
from tl_deploy.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from tl_deploy.artifact import Artifact

FORMAT = "tl_deploy.onnx"
FORMAT_VERSION = 1
PREFIX = "tl_deploy."

FLOAT_NCHW = "float32_nchw"  # (N, 3, H, W) float32, normalised by the PreprocessSpec
UINT8_NHWC = "uint8_nhwc"  # (N, H, W, 3) uint8 RGB, resized and cropped; the graph normalises
INPUT_LAYOUTS = (FLOAT_NCHW, UINT8_NHWC)
PRECISIONS = ("fp32", "fp16", "int8")


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

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> OnnxMetadata:
        """The metadata every export of ``artifact`` carries."""
        return cls(class_names=tuple(artifact.class_names), spec=artifact.spec,
                   source_checksum=artifact.checksum, architecture=artifact.architecture.name)

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
        try:
            return cls(
                class_names=tuple(str(c) for c in data["class_names"]),
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
