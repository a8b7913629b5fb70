"""The on-disk model artifact: a folder that fully describes a fine-tuned classifier.

::

    models/<run-name>/
      model.safetensors   weights (no pickle)
      config.json         architecture, classes, PreprocessSpec, training config, versions, metrics,
                          and for an adapted model its lineage (``adaptation``)
      metrics.json        train/val/test accuracy and loss, per-class accuracy, confusion matrix
      curves.png          training curves
      confusion.png       test (or val) confusion matrix
      manifest.json       sha256 of every file above, checked at load

The folder is built under a temporary name and moved into place, so a crash never leaves a
half-written artifact that loads.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_deploy import __version__
from tl_deploy.errors import ArtifactError
from tl_deploy.fileio import atomic_dir, atomic_write_json, parse_json, read_json, sha256_bytes, sha256_file
from tl_deploy.formats.metadata import OnnxMetadata
from tl_deploy.formats.names import ARTIFACT_CONFIG, ARTIFACT_MANIFEST, ARTIFACT_METRICS, ARTIFACT_WEIGHTS
from tl_deploy.heads import MULTI_LEVEL_HEAD
from tl_deploy.preprocess import PreprocessSpec

_logger = logging.getLogger(__name__)

FORMAT = "tl_deploy.model"
FORMAT_VERSION = 1
# what save_artifact always writes and the manifest lists
REQUIRED_FILES = (ARTIFACT_WEIGHTS, ARTIFACT_CONFIG, ARTIFACT_METRICS)


def non_finite_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or infinity."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _refuse_non_finite(state: dict[str, torch.Tensor], where: str, fix: str) -> None:
    bad = non_finite_weights(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ArtifactError(f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity ({shown}). {fix}")


def package_versions() -> dict[str, str]:
    """Versions that matter to reproduce or load an artifact."""
    versions = {"tl_deploy": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("timm", "torchvision", "numpy", "onnx", "onnxruntime", "safetensors"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            continue
    return versions


@dataclass(frozen=True)
class Architecture:
    """What is needed to rebuild the network before loading its weights."""

    name: str  # timm model name
    num_classes: int
    head: str = "linear"  # classifier head kind: linear | attention-fusion
    drop_rate: float = 0.2  # dropout before the classifier (training only)
    fusion_levels: int = 0  # attention-fusion: backbone levels fused (0 for a linear head)
    fusion_dim: int = 0  # attention-fusion: common width of the projected levels
    channel_attention: bool = False  # attention-fusion: squeeze-and-excitation on the fused vector
    levels: int = 0  # multi-level-linear: the final features + the last levels - 1 block outputs
    flip_tta: bool = False  # multi-level-linear: features averaged with the mirror image's in the network
    img_size: int | None = None  # fixed-size backbones (ViT): the input side they were built for; else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "num_classes": self.num_classes, "head": self.head,
                               "drop_rate": self.drop_rate}
        if self.head == MULTI_LEVEL_HEAD:
            out.update(levels=self.levels, flip_tta=self.flip_tta)
        elif self.head != "linear":
            out.update(fusion_levels=self.fusion_levels, fusion_dim=self.fusion_dim,
                       channel_attention=self.channel_attention)
        if self.img_size is not None:
            out["img_size"] = self.img_size
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Architecture:
        num_classes = d["num_classes"]
        if not isinstance(num_classes, int) or isinstance(num_classes, bool):
            raise TypeError(f"num_classes must be an integer, got {num_classes!r}")
        return cls(name=str(d["name"]), num_classes=num_classes, head=str(d.get("head", "linear")),
                   drop_rate=float(d.get("drop_rate", 0.0)), fusion_levels=int(d.get("fusion_levels", 0)),
                   fusion_dim=int(d.get("fusion_dim", 0)), channel_attention=bool(d.get("channel_attention", False)),
                   levels=int(d.get("levels", 0)), flip_tta=bool(d.get("flip_tta", False)),
                   img_size=_optional_size(d.get("img_size")))


@dataclass
class Artifact:
    """A loaded artifact: a ready model (eval mode) plus everything that describes it."""

    path: Path
    model: nn.Module
    architecture: Architecture
    class_names: list[str]
    spec: PreprocessSpec
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""  # sha256 of manifest.json: one id for the whole artifact

    @property
    def name(self) -> str:
        return self.path.name

    def onnx_metadata(self) -> OnnxMetadata:
        """The metadata every export of this artifact carries."""
        return OnnxMetadata(class_names=tuple(self.class_names), spec=self.spec, source_checksum=self.checksum,
                            architecture=self.architecture.name)

    def transform(self):  # type: ignore[no-untyped-def]
        """The eval transform: image (path, PIL, array or bytes) -> (3, H, W) float tensor."""
        from tl_deploy.data import eval_transform

        return eval_transform(self.spec)


def _optional_size(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 8192:
        raise TypeError(f"img_size must be a positive integer up to 8192, got {value!r}")
    return value


def build_model(arch: Architecture) -> nn.Module:
    """An untrained network of the artifact's architecture (weights come from the artifact)."""
    from tl_deploy.backbones import create_model
    from tl_deploy.heads import HEADS, create_fusion_model, create_multi_level_model

    if arch.head == MULTI_LEVEL_HEAD:
        return create_multi_level_model(arch.name, arch.num_classes, weights="none", levels=arch.levels,
                                        flip_tta=arch.flip_tta, img_size=arch.img_size)
    if arch.head == "attention-fusion":
        return create_fusion_model(arch.name, arch.num_classes, weights="none", drop_rate=arch.drop_rate,
                                   levels=arch.fusion_levels, dim=arch.fusion_dim,
                                   channel_attention=arch.channel_attention, img_size=arch.img_size)
    if arch.head != "linear":
        raise ArtifactError(f"Unknown head {arch.head!r} in artifact; this tl_deploy knows "
                            f"{', '.join([*HEADS, MULTI_LEVEL_HEAD])}.")
    return create_model(arch.name, num_classes=arch.num_classes, weights="none", drop_rate=arch.drop_rate,
                        img_size=arch.img_size)


def save_artifact(
    out_dir: str | Path,
    model: nn.Module,
    *,
    architecture: Architecture,
    class_names: list[str],
    spec: PreprocessSpec,
    training: dict[str, Any],
    metrics: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
    adaptation: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact folder atomically and return its path.

    ``adaptation``: the lineage of a model adapted from another artifact (``tl-deploy adapt``), stored as
    the config's ``adaptation`` key; every consumer reads the artifact as any other.
    """
    from safetensors.torch import save_file

    if len(class_names) != architecture.num_classes:
        raise ArtifactError(
            f"{len(class_names)} class names for a {architecture.num_classes}-class model."
        )
    out = Path(out_dir)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture.to_dict(),
        "class_names": list(class_names),
        "preprocess": spec.to_dict(),
        "training": training,
        "versions": package_versions(),
        "metrics": summary,
    }
    if adaptation is not None:
        config["adaptation"] = adaptation
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _refuse_non_finite(state, f"Not saving {out}", "Training diverged: lower --lr or --weight-decay, or "
                       "check the data; nothing was written.")
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / ARTIFACT_WEIGHTS), metadata={"format": FORMAT})
        (tmp / ARTIFACT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / ARTIFACT_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {"format": FORMAT, "files": {n: sha256_file(tmp / n) for n in files}}
        (tmp / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _logger.info("wrote artifact %s", out)
    return out


def verify_manifest(path: Path) -> str:
    """Check every file listed in manifest.json; return the manifest's sha256."""
    manifest_path = path / ARTIFACT_MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {ARTIFACT_MANIFEST}: not a complete tl_deploy artifact.")
    raw = manifest_path.read_bytes()
    try:
        files = parse_json(raw, manifest_path)["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"Corrupt {manifest_path}: {exc}. Re-run fine-tuning.") from exc
    if not isinstance(files, dict) or not all(
            isinstance(n, str) and Path(n).name == n and n not in ("", ".", "..") and isinstance(e, str)
            for n, e in files.items()):
        raise ArtifactError(f"Corrupt {manifest_path}: 'files' must map plain file names to sha256 strings.")
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if unlisted:
        raise ArtifactError(f"Corrupt {manifest_path}: it lists no checksum for {', '.join(unlisted)}, which every "
                            "artifact has. Re-run fine-tuning, or pass --no-verify to load it anyway.")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"Artifact {path} is incomplete: {name} is missing.")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"Artifact file {file} was modified (sha256 {actual[:12]}..., manifest says "
                f"{expected[:12]}...). Restore it, or pass --no-verify to load it anyway."
            )
    return sha256_bytes(raw)


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"Model artifact folder not found: {path}. Run python -m tl_deploy.finetune first.")
    config_path = path / ARTIFACT_CONFIG
    if not config_path.is_file():
        raise ArtifactError(f"{path} is not a tl_deploy model artifact: {ARTIFACT_CONFIG} is missing.")
    try:
        config = read_json(config_path)
    except ValueError as exc:
        raise ArtifactError(f"Corrupt {config_path}: {exc}.") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ArtifactError(f"{config_path} is not a {FORMAT} config.")
    version = config.get("format_version", 0)
    if not isinstance(version, int):
        raise ArtifactError(f"{config_path}: invalid format_version {version!r}.")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} uses artifact format {config['format_version']}, newer than this tl_deploy "
            f"understands ({FORMAT_VERSION}). Upgrade tl_deploy."
        )
    return config


def load_artifact(path: str | Path, *, verify: bool = True, device: str = "cpu") -> Artifact:
    """Load an artifact folder into a ready model (eval mode) with its preprocessing."""
    from safetensors.torch import load_file

    from tl_deploy.formats.metadata import class_names_problem

    path = Path(path)
    config = read_config(path)
    if verify:
        checksum = verify_manifest(path)
    else:
        checksum = sha256_file(path / ARTIFACT_MANIFEST) if (path / ARTIFACT_MANIFEST).is_file() else ""
    try:
        arch = Architecture.from_dict(config["architecture"])
        problem = class_names_problem(config["class_names"])
        if problem:
            raise TypeError(problem)
        class_names = list(config["class_names"])
        spec = PreprocessSpec.from_dict(config["preprocess"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ArtifactError(f"Invalid {path / ARTIFACT_CONFIG}: missing or bad field ({exc}).") from exc
    if not 2 <= arch.num_classes == len(class_names) or not 0.0 <= arch.drop_rate < 1.0:
        raise ArtifactError(
            f"Invalid {path / ARTIFACT_CONFIG}: num_classes {arch.num_classes} must be >= 2 and match the "
            f"{len(class_names)} class names; drop_rate {arch.drop_rate} must be in [0, 1)."
        )
    model = build_model(arch)
    weights_path = path / ARTIFACT_WEIGHTS
    if not weights_path.is_file():
        raise ArtifactError(f"Artifact {path} is incomplete: {ARTIFACT_WEIGHTS} is missing.")
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
        raise ArtifactError(f"Weights in {weights_path} do not fit {arch.name} or are unreadable: "
                            f"{str(exc)[:300]}") from exc
    _refuse_non_finite(state, f"Refusing {weights_path}", "Re-run fine-tuning; such a model predicts nothing.")
    model.to(device).eval()
    metrics: dict[str, Any] = {}
    if (path / ARTIFACT_METRICS).is_file():
        try:
            loaded = read_json(path / ARTIFACT_METRICS)
        except ValueError as exc:
            raise ArtifactError(f"Corrupt {path / ARTIFACT_METRICS}: {exc}.") from exc
        metrics = loaded if isinstance(loaded, dict) else {}
    return Artifact(path=path, model=model, architecture=arch, class_names=class_names, spec=spec,
                    config=config, metrics=metrics, checksum=checksum)


def write_json_report(path: str | Path, obj: Any) -> None:
    """Reports next to artifacts are written atomically too."""
    atomic_write_json(path, obj)
