"""A TensorRT engine's JSON sidecar ``<engine>.json``: where the engine may run and what it is.

A serialized engine only loads on the TensorRT version and GPU model it was built with, so every
engine gets a sidecar (written by export, read by the runtime). ``check_sidecar`` is a pure
function of that dict and the current environment, and refuses foreign or tampered engines with a
message that says how to rebuild. Nothing here imports TensorRT.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_deploy.errors import ArtifactError
from tl_deploy.fileio import read_json
from tl_deploy.formats.metadata import OnnxMetadata
from tl_deploy.formats.names import PRECISIONS

SIDECAR_FORMAT = "tl_deploy.trt_engine"
SIDECAR_VERSION = 1
_SIDECAR_FIELDS = ("format", "format_version", "tensorrt", "gpu", "compute_capability", "precision",
                   "profile", "onnx_sha256", "engine_sha256", "metadata")
REBUILD = ("Engines only load on the TensorRT version and GPU they were built with: rebuild it on this "
           "machine with python -m tl_deploy.export MODEL_DIR --trt (add --int8/--fp16 as before), "
           "or load the .onnx file with the onnxruntime backend.")


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts (``min..max``) and the one it is tuned for (``opt``)."""

    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """An engine's sidecar: ``<engine>.json`` next to it."""
    return Path(f"{engine_path}.json")


def read_sidecar(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar dict of an engine file (read, not checked: ``check_sidecar`` judges it)."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ArtifactError(
            f"{engine_path} has no sidecar {path.name}: its TensorRT version and GPU are unknown. "
            "Rebuild it with python -m tl_deploy.export MODEL_DIR --trt."
        )
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ArtifactError(f"Corrupt engine sidecar {path}: {exc}. Rebuild the engine.") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"Corrupt engine sidecar {path}: not a JSON object. Rebuild the engine.")
    return data


def check_sidecar(sidecar: Mapping[str, Any], env: Mapping[str, str], *, engine_sha256: str | None = None,
                  engine_name: str = "engine") -> OnnxMetadata:
    """Refuse an engine that was tampered with or built elsewhere; return its model metadata.

    Pure: depends only on the sidecar dict, the environment dict (TensorRT version, GPU name and
    compute capability, ``runtime.gpu.current_environment()``) and the engine file's sha256
    (``None`` skips that check).
    """
    missing = [key for key in _SIDECAR_FIELDS if key not in sidecar]
    if missing:
        raise ArtifactError(f"Engine sidecar of {engine_name} is incomplete (missing {missing}). {REBUILD}")
    if sidecar["format"] != SIDECAR_FORMAT:
        raise ArtifactError(f"{engine_name}: sidecar format {sidecar['format']!r} is not {SIDECAR_FORMAT!r}.")
    if not isinstance(sidecar["format_version"], int) or sidecar["format_version"] > SIDECAR_VERSION:
        raise ArtifactError(f"{engine_name}: sidecar format {sidecar['format_version']} is newer than this "
                            f"tl_deploy understands ({SIDECAR_VERSION}). Upgrade tl_deploy.")
    if engine_sha256 is not None and sidecar["engine_sha256"] != engine_sha256:
        raise ArtifactError(
            f"{engine_name} does not match its sidecar (sha256 {engine_sha256[:12]}..., sidecar says "
            f"{str(sidecar['engine_sha256'])[:12]}...): the file was modified or replaced. {REBUILD}"
        )
    built = (f"TensorRT {sidecar['tensorrt']} on {sidecar['gpu']} "
             f"(compute capability {sidecar['compute_capability']})")
    here = f"TensorRT {env.get('tensorrt')} on {env.get('gpu')} (compute capability {env.get('compute_capability')})"
    if (str(sidecar["tensorrt"]) != env.get("tensorrt") or str(sidecar["gpu"]) != env.get("gpu")
            or str(sidecar["compute_capability"]) != env.get("compute_capability")):
        raise ArtifactError(f"{engine_name} was built with {built}; this machine has {here}. {REBUILD}")
    if not isinstance(sidecar["precision"], str) or sidecar["precision"] not in PRECISIONS:
        raise ArtifactError(f"{engine_name}: unknown precision {sidecar['precision']!r} in its sidecar. {REBUILD}")
    if not isinstance(sidecar["metadata"], Mapping):
        raise ArtifactError(f"{engine_name}: the sidecar's metadata is not a JSON object. {REBUILD}")
    return OnnxMetadata.from_dict(sidecar["metadata"], origin=f"{engine_name} sidecar")


def make_sidecar(*, env: Mapping[str, str], precision: str, profile: BatchProfile, input_name: str,
                 input_shape: tuple[int, ...], workspace_bytes: int, strongly_typed: bool, onnx_file: str,
                 onnx_sha256: str, engine_sha256: str, metadata: OnnxMetadata, build_seconds: float) -> dict[str, Any]:
    """The sidecar dict written next to an engine (pure, but for the build time stamp)."""
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "tensorrt": env["tensorrt"],
        "gpu": env["gpu"],
        "compute_capability": env["compute_capability"],
        "precision": precision,
        "strongly_typed": strongly_typed,
        "profile": {**profile.to_dict(), "input": input_name, "shape": list(input_shape)},
        "workspace_bytes": workspace_bytes,
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
        "engine_sha256": engine_sha256,
        "metadata": metadata.to_dict(),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 2),
    }
