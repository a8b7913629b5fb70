"""Frozen-backbone features, computed once and cached on disk.

A linear probe trains only the head, so the backbone's pooled features of every image are a pure
function of (model, weights, preprocessing, image bytes). They are computed once in eval mode with
the deterministic eval transform and stored as safetensors, keyed by a hash of all four; later epochs
(and later runs) train the head on the cache and never run the backbone again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tl_deploy.data import ImageDataset, Sample, eval_transform
from tl_deploy.fileio import atomic_path
from tl_deploy.models import pooled_features
from tl_deploy.preprocess import PreprocessSpec

_logger = logging.getLogger(__name__)
def samples_digest(samples: Sequence[Sample]) -> str:
    """Hash of the images' bytes and labels, in order: a changed or relabelled file changes it."""
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{label}:".encode())
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def cache_key(model_id: str, spec: PreprocessSpec, samples: Sequence[Sample]) -> str:
    """One key for (model + weights identity, preprocessing, data)."""
    payload = json.dumps({"model": model_id, "preprocess": spec.to_dict(),
                          "data": samples_digest(samples)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@torch.no_grad()
def compute_features(
    model: nn.Module, samples: Sequence[Sample], spec: PreprocessSpec, *, device: torch.device,
    batch_size: int = 128, workers: int = 0, desc: str = "features",
) -> torch.Tensor:
    """(N, D) pooled backbone features, eval mode, eval transform."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(spec)), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    chunks = []
    for x, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        x = x.to(device).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        chunks.append(pooled_features(model, x).float().cpu())  # (B, D)
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.no_grad()
def compute_activations(
    prefix: nn.Module, samples: Sequence[Sample], spec: PreprocessSpec, *, device: torch.device,
    batch_size: int = 128, workers: int = 0, desc: str = "activations",
) -> torch.Tensor:
    """(N, C, H, W) float32 outputs of a frozen prefix of the network, eval transform, kept in memory.

    Fine-tuning with the first stages frozen and no augmentation sees the same prefix output for an
    image every epoch, so it is computed once.
    """
    was_training = prefix.training
    prefix.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(spec)), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    chunks = []
    for x, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        x = x.to(device).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        chunks.append(prefix(x).float())  # (B, C, h, w)
    prefix.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def cached_features(
    model: nn.Module, model_id: str, samples: Sequence[Sample], spec: PreprocessSpec, *,
    device: torch.device, cache_dir: Path | None, batch_size: int = 128, workers: int = 0,
    desc: str = "features", compute: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Features from the on-disk cache, computing and storing them on a miss.

    ``compute`` replaces the default computation (``compute_features``) on a miss, e.g. to derive
    the features from prefix activations that are already in memory.
    """
    from safetensors.torch import load_file, save_file

    def run() -> torch.Tensor:
        if compute is not None:
            return compute()
        return compute_features(model, samples, spec, device=device, batch_size=batch_size,
                                workers=workers, desc=desc)

    if cache_dir is None:
        return run()
    key = cache_key(model_id, spec, samples)
    path = cache_dir / "features" / f"{key}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))["features"]
            if feats.shape[0] == len(samples):
                _logger.info("%s: %d cached features (%s)", desc, len(samples), path.name)
                return feats
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            _logger.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    feats = run()
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp))
    return feats
