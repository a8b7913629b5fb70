"""What a run settles before it trains: device, seeds, data folder, output folder, network, identities."""

from __future__ import annotations

import os
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tl_deploy.artifact import Architecture
from tl_deploy.backbones import EMBEDDED_WEIGHTS, create_model, fixed_input_size
from tl_deploy.data import Sample
from tl_deploy.errors import BackendUnavailableError, DataError, TlDeployError
from tl_deploy.fileio import check_output_folder, check_output_writable, sha256_file
from tl_deploy.heads import DEFAULT_MULTI_LEVELS, MULTI_LEVEL_HEAD, create_fusion_model, create_multi_level_model
from tl_deploy.train.config import TrainConfig

DEFAULT_DATA = Path("data/animal-shape")
NATIVE_SAMPLE = 64  # images whose headers give the data's native resolution (--img-size auto)


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (CUDA when present), cpu, cuda or cuda:N; refuses CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"--device {name} asked for a GPU but CUDA is not available here "
            f"(torch {torch.__version__}). Use --device cpu, or install a CUDA build of torch on a GPU machine."
        )
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TlDeployError(f"Invalid --device {name!r}. Use auto, cpu, cuda or cuda:N.")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and torch; ``deterministic``: deterministic algorithms (slower)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def resolve_data(data: str | None) -> Path:
    """The ImageFolder root: ``data``, or the embedded Animal-Shape default (built on first use)."""
    if data is not None:
        return Path(data)
    from tl_deploy.datasets import prepare_animal_shape, split_differences

    # The default run trains on the default split; a tree the user made with other options is theirs.
    differences = split_differences(DEFAULT_DATA, "animal-shape", seed=0, val_fraction=0.1, test_fraction=0.2)
    if differences:
        raise DataError(
            f"{DEFAULT_DATA} was built with other options ({'; '.join(differences)}), so it is not the "
            f"default data and rebuilding it would replace it: pass --data {DEFAULT_DATA} to train on it, "
            "or move it away to let the default run rebuild the default split."
        )
    return prepare_animal_shape(DEFAULT_DATA, seed=0, val_fraction=0.1, test_fraction=0.2)


def run_name(cfg: TrainConfig, data_dir: Path) -> str:
    """``--name``, or ``<data>-<model>-<strategy>``."""
    if cfg.name:
        return cfg.name
    return f"{data_dir.resolve().name}-{cfg.model}-{cfg.strategy}"


def check_output(cfg: TrainConfig, out: Path, data_dir: Path) -> None:
    """Before any work: ``out`` follows the output rule (new, empty or an earlier artifact, never an
    input of this run) and has room for the artifact."""
    weights = None if cfg.weights in ("embedded", "hub", "none") else cfg.weights
    check_output_folder(out, "model artifact", inputs={
        "training data": data_dir, "target-domain images": cfg.target_unlabeled, "starting weights": weights})
    check_output_writable(out)


def weights_identity(model: str, weights: str, seed: int) -> str:
    """A string that changes whenever the starting weights change (feature-cache key part)."""
    if weights == "embedded" and model in EMBEDDED_WEIGHTS:
        return f"{model}:embedded:{sha256_file(EMBEDDED_WEIGHTS[model]())}"
    if weights == "none":
        return f"{model}:random:{seed}"
    if weights == "hub":
        import timm

        return f"{model}:hub:timm-{timm.__version__}"
    return f"{model}:file:{sha256_file(weights)}"


def features_identity(cfg: TrainConfig) -> str:
    """Feature-cache key part: the starting weights plus which features the head reads."""
    identity = weights_identity(cfg.model, cfg.weights, cfg.seed)
    return identity if cfg.head == "linear" else f"{identity}|{cfg.head}:{cfg.fusion_levels}"


def native_size(samples: Sequence[Sample], seed: int) -> int | None:
    """The data's native resolution: the median shorter side of a seeded sample of ``NATIVE_SAMPLE`` images.

    PIL reads only each file's header (no pixels are decoded), so this costs milliseconds on any data set;
    unreadable files are left to the data checks that report them. None when no image could be read.
    """
    from PIL import Image

    chosen = random.Random(seed).sample(list(samples), min(NATIVE_SAMPLE, len(samples)))
    sides = []
    for path, _ in chosen:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except Exception:  # noqa: BLE001 - PIL raises many types on bad files; they are reported elsewhere
            continue
    return int(statistics.median(sides)) if sides else None


def input_size_of(cfg: TrainConfig, img_size: int) -> int | None:
    """What the network is built for: ``img_size`` for fixed-size architectures (ViT), else None (any size)."""
    return img_size if fixed_input_size(cfg.model) else None


def build_network(cfg: TrainConfig, num_classes: int, img_size: int | None = None) -> nn.Module:
    """The backbone with the chosen head, starting weights loaded (fixed-size backbones built for ``img_size``)."""
    if cfg.few_shot_active:
        return create_multi_level_model(cfg.model, num_classes, weights=cfg.weights, img_size=img_size)
    if cfg.head == "attention-fusion":
        return create_fusion_model(cfg.model, num_classes, weights=cfg.weights, drop_rate=cfg.drop_rate,
                                   levels=cfg.fusion_levels, dim=cfg.fusion_dim,
                                   channel_attention=cfg.channel_attention, img_size=img_size)
    return create_model(cfg.model, num_classes=num_classes, weights=cfg.weights, drop_rate=cfg.drop_rate,
                        img_size=img_size)


def architecture(cfg: TrainConfig, num_classes: int, img_size: int | None = None) -> Architecture:
    """What the artifact records to rebuild the network (``img_size``: a fixed-size backbone's input side)."""
    built_for = input_size_of(cfg, img_size) if img_size is not None else None
    if cfg.few_shot_active:
        return Architecture(name=cfg.model, num_classes=num_classes, head=MULTI_LEVEL_HEAD, drop_rate=0.0,
                            levels=DEFAULT_MULTI_LEVELS, flip_tta=True, img_size=built_for)
    if cfg.head == "attention-fusion":
        return Architecture(name=cfg.model, num_classes=num_classes, head=cfg.head, drop_rate=cfg.drop_rate,
                            fusion_levels=cfg.fusion_levels, fusion_dim=cfg.fusion_dim,
                            channel_attention=cfg.channel_attention, img_size=built_for)
    return Architecture(name=cfg.model, num_classes=num_classes, drop_rate=cfg.drop_rate, img_size=built_for)
