"""Classifier heads beyond timm's linear one: attention fusion over several backbone depths, and the
few-shot recipe's linear head over several depths with flip test-time augmentation.

``--head attention-fusion`` pools the feature maps of the last K levels of the backbone (the stage
outputs from timm's ``forward_intermediates`` plus the final features the linear head sees),
projects each to one width, and mixes them with attention weights computed per image over the
levels (additive attention), optionally followed by squeeze-and-excitation channel attention. The
head learns which depths of the source network transfer to the target domain.

The network keeps timm's classifier interface (``forward_features`` returns the concatenated pooled
levels, ``forward_head(pre_logits=True)`` is the identity on them, ``get_classifier()`` is the fusion
head), so the feature cache, linear probing, LP-FT, partial unfreezing and every exporter work on it
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tl_deploy.errors import ModelError

HEADS = ("linear", "attention-fusion")
DEFAULT_FUSION_LEVELS = 3  # final features + the last two stage outputs
DEFAULT_FUSION_DIM = 256  # common width of the projected levels
MULTI_LEVEL_HEAD = "multi-level-linear"  # the few-shot recipe's head (tl_deploy.train.few_shot), not a --head choice
# Final features + the outputs of efficientnet_lite0's last five blocks. 10 labels per class, val (3 seeds, 66
# views, flip TTA): final features alone 84.9%, + last 3 blocks 87.0%, + last 5 blocks 87.4%, + all 7 blocks 87.4%.
DEFAULT_MULTI_LEVELS = 6


class AttentionFusionHead(nn.Module):
    """(B, sum C_k) concatenated pooled levels -> (B, num_classes) logits."""

    def __init__(self, level_dims: Sequence[int], num_classes: int, dim: int = DEFAULT_FUSION_DIM,
                 channel_attention: bool = True, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.level_dims = [int(c) for c in level_dims]
        # Levels differ in width and scale (early stages: few, small activations); LayerNorm first
        # lets the attention compare them on one footing.
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(c), nn.Linear(c, dim)) for c in self.level_dims)
        hidden = max(8, dim // 4)
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.channel: nn.Module | None = None
        if channel_attention:
            self.channel = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Sigmoid())
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes)
        self.out_features = num_classes
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # same small init as a new linear head
        nn.init.zeros_(self.fc.bias)

    def level_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, sum C_k) -> (B, K) attention weight of each level (rows sum to 1)."""
        return torch.softmax(self.score(self._project(x)), dim=1).squeeze(-1)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.level_dims, dim=1)  # K x (B, C_k)
        return torch.stack([proj(part) for proj, part in zip(self.proj, parts)], dim=1)  # (B, K, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._project(x)  # (B, K, D)
        weights = torch.softmax(self.score(z), dim=1)  # (B, K, 1)
        fused = (weights * z).sum(dim=1)  # (B, D)
        if self.channel is not None:
            fused = fused * self.channel(fused)  # (B, D) channel gates in (0, 1)
        return self.fc(self.drop(fused))  # type: ignore[no-any-return]  # (B, num_classes)


class _LevelsClassifier(nn.Module):
    """A timm backbone as ``self.backbone`` and a head over its pooled levels as ``self.head``: the
    timm-style interface (``forward_head``, ``get_classifier``, ``group_matcher``) both level models share.
    Subclasses define ``forward_features``."""

    backbone: nn.Module
    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # type: ignore[no-any-return]

    def get_classifier(self) -> nn.Module:
        return self.head

    def group_matcher(self, coarse: bool = False) -> Any:
        """timm's layer grouping of the backbone (for stage unfreezing and layer decay); the head last."""
        from timm.models._manipulate import group_parameters

        layer_of = group_parameters(self.backbone, self.backbone.group_matcher(coarse),  # type: ignore[operator]
                                    reverse=True)

        def ordinal(name: str) -> tuple[float]:
            inner = name.removeprefix("backbone.")
            return (float(layer_of[inner]),) if name != inner and inner in layer_of else (float("inf"),)

        return ordinal


class FusionClassifier(_LevelsClassifier):
    """A timm backbone (classifier removed) with an :class:`AttentionFusionHead` over its last levels."""

    def __init__(self, backbone: nn.Module, num_classes: int, levels: int = DEFAULT_FUSION_LEVELS,
                 dim: int = DEFAULT_FUSION_DIM, channel_attention: bool = True, drop_rate: float = 0.2) -> None:
        super().__init__()
        stage_channels = [int(info["num_chs"]) for info in backbone.feature_info]  # type: ignore[union-attr]
        if not 2 <= levels <= len(stage_channels) + 1:
            raise ModelError(f"Invalid --fusion-levels {levels}: this backbone offers 2..{len(stage_channels) + 1} "
                             "levels (its stages plus the final features).")
        self.backbone = backbone
        self.levels = levels
        self.level_dims = [*stage_channels[len(stage_channels) - (levels - 1):], int(backbone.num_features)]  # type: ignore[arg-type]
        self.num_features = sum(self.level_dims)
        self.num_classes = num_classes
        self.head = AttentionFusionHead(self.level_dims, num_classes, dim, channel_attention, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, sum C_k): every level's feature map, globally average-pooled."""
        final, stages = self.backbone.forward_intermediates(x, indices=self.levels - 1)  # type: ignore[operator]
        return torch.cat([fmap.mean(dim=(2, 3)) for fmap in [*stages, final]], dim=1)


def create_fusion_model(name: str, num_classes: int, weights: str = "embedded", drop_rate: float = 0.2,
                        levels: int = DEFAULT_FUSION_LEVELS, dim: int = DEFAULT_FUSION_DIM,
                        channel_attention: bool = True, img_size: int | None = None) -> FusionClassifier:
    """A pretrained (or random, ``weights='none'``) timm backbone with an attention-fusion head."""
    from tl_deploy.backbones import create_model

    backbone = create_model(name, num_classes=num_classes, weights=weights, drop_rate=0.0, img_size=img_size)
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "feature_info"):
        raise ModelError(f"{name!r} has no intermediate-feature API in this timm: use --head linear.")
    backbone.reset_classifier(0)  # type: ignore[operator]
    return FusionClassifier(backbone, num_classes, levels, dim, channel_attention, drop_rate)


def _out_channels(block: nn.Module) -> int:
    """Channels a timm EfficientNet-family block outputs: those of its last convolution."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError(f"cannot tell the output channels of {type(block).__name__}: it has no convolution.")
    return int(convs[-1].out_channels)


class MultiLevelClassifier(_LevelsClassifier):
    """A timm EfficientNet-family backbone with one linear head over the pooled outputs of its last blocks.

    ``forward_features`` average-pools the outputs of the last ``levels - 1`` blocks and the final
    features and concatenates them (early blocks see the shape's outline, late ones its semantics:
    with a few labels both help). With ``flip_tta`` it also runs the horizontally flipped image and
    averages the two feature vectors, which averages the two logits exactly, since the head is
    linear: the flip test-time augmentation is part of the network, so every export computes it.
    ``get_classifier()`` is the ``nn.Linear`` head, so the feature cache and linear probing work on it.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, levels: int = DEFAULT_MULTI_LEVELS,
                 flip_tta: bool = True) -> None:
        super().__init__()
        missing = [a for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2") if not hasattr(backbone, a)]
        if missing:
            raise ModelError(f"the multi-level head needs a timm EfficientNet-family backbone; "
                             f"{type(backbone).__name__} has no {', '.join(missing)}: pass --few-shot off.")
        blocks = list(backbone.blocks)  # type: ignore[arg-type]
        if not 2 <= levels <= len(blocks) + 1:
            raise ModelError(f"Invalid multi-level head with {levels} levels: this backbone offers "
                             f"2..{len(blocks) + 1} (its blocks plus the final features).")
        self.backbone = backbone
        self.levels = levels
        self.flip_tta = flip_tta
        self.first_level_block = len(blocks) - (levels - 1)
        self.level_dims = [*(_out_channels(b) for b in blocks[self.first_level_block:]), int(backbone.num_features)]  # type: ignore[arg-type]
        self.num_features = sum(self.level_dims)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # same small init as a new linear head
        nn.init.zeros_(self.head.bias)

    def pooled_levels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, sum C_k): the pooled levels of these images as they are (no flip)."""
        b = self.backbone
        x = b.bn1(b.conv_stem(x))  # type: ignore[operator]
        pooled = []
        for i, block in enumerate(b.blocks):  # type: ignore[arg-type]
            x = block(x)
            if i >= self.first_level_block:
                pooled.append(x.mean(dim=(2, 3)))  # (B, C_i)
        x = b.bn2(b.conv_head(x))  # type: ignore[operator]
        return torch.cat([*pooled, x.mean(dim=(2, 3))], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, sum C_k): pooled levels, averaged with the flipped image's when ``flip_tta``."""
        if not self.flip_tta:
            return self.pooled_levels(x)
        both = self.pooled_levels(torch.cat([x, x.flip(3)]))  # (2B, D): the images, then their mirror images
        return both.reshape(2, -1, self.num_features).mean(dim=0)  # (B, D)


def create_multi_level_model(name: str, num_classes: int, weights: str = "embedded",
                             levels: int = DEFAULT_MULTI_LEVELS, flip_tta: bool = True,
                             img_size: int | None = None) -> MultiLevelClassifier:
    """A pretrained (or random, ``weights='none'``) timm backbone with the multi-level linear head."""
    from tl_deploy.backbones import create_model

    backbone = create_model(name, num_classes=num_classes, weights=weights, drop_rate=0.0, img_size=img_size)
    backbone.reset_classifier(0)  # type: ignore[operator]
    return MultiLevelClassifier(backbone, num_classes, levels, flip_tta)
