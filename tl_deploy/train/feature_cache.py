"""Frozen-backbone features, computed once and cached on disk.

A linear probe trains only the head, so the backbone's pooled features of every image are a pure
function of (model, weights, preprocessing, image bytes). They are computed once in eval mode with
the deterministic eval transform and stored as safetensors, keyed by a hash of all four; later epochs
(and later runs) train the head on the cache and never run the backbone again.

For the few-shot recipe the cache also holds several *views* of each image (``compute_view_features``):
the image, its mirror image and random flips + affine transforms, (N, V, D) in one entry: feature
augmentation computed once, so the head trains on V times as many rows without running the backbone.

Under torchrun each process computes the features of its block of the images; the blocks are gathered
once, rank 0 writes the cache, and a cache hit read by rank 0 is broadcast to the other ranks.
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

from tl_deploy.backbones import feature_dim, pooled_features
from tl_deploy.data import ImageDataset, Sample, Transform, eval_transform, train_transform
from tl_deploy.fileio import atomic_path
from tl_deploy.preprocess import ImageInput, PreprocessSpec
from tl_deploy.train import distributed
from tl_deploy.train.distributed import SINGLE, DistContext

_logger = logging.getLogger(__name__)


def samples_digest(samples: Sequence[Sample]) -> str:
    """Hash of the images' bytes and labels, in order: a changed or relabelled file changes it."""
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{label}:".encode())
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def cache_key(model_id: str, spec: PreprocessSpec, samples: Sequence[Sample]) -> str:
    """One key for (model + weights identity, preprocessing, data); the spec's provenance is no part of it."""
    preprocess = {k: v for k, v in spec.to_dict().items() if k != "source"}
    payload = json.dumps({"model": model_id, "preprocess": preprocess,
                          "data": samples_digest(samples)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@torch.no_grad()
def _eval_outputs(
    module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], samples: Sequence[Sample],
    spec: PreprocessSpec, *, device: torch.device, batch_size: int, workers: int, desc: str,
    transform: Transform | None = None,
) -> list[torch.Tensor]:
    """``forward`` of every batch of images, ``module`` in eval mode, eval transform (or ``transform``):
    float32 chunks."""
    was_training = module.training
    module.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, transform or eval_transform(spec)),
                                         batch_size=batch_size, shuffle=False, num_workers=workers)
    chunks = []
    for x, _ in tqdm(loader, desc=desc, leave=False, disable=distributed.tqdm_disable()):
        x = x.to(device).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        chunks.append(forward(x).float())
    module.train(was_training)
    return chunks


def compute_features(
    model: nn.Module, samples: Sequence[Sample], spec: PreprocessSpec, *, device: torch.device,
    batch_size: int = 128, workers: int = 0, desc: str = "features", dist: DistContext = SINGLE,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(N, D) pooled backbone features, eval mode, eval transform; sharded over the ranks and gathered.
    ``forward`` computes them instead of ``pooled_features`` (e.g. ``tl_deploy.train.stage_cache.frozen_forward``)."""
    run = forward or (lambda x: pooled_features(model, x))
    chunks = _eval_outputs(model, lambda x: run(x).cpu(), distributed.shard(samples, dist), spec,
                           device=device, batch_size=batch_size, workers=workers, desc=desc)  # (B, D) each
    local = torch.cat(chunks) if chunks else torch.empty(0, feature_dim(model))  # (N / world, D)
    return distributed.all_gather_cat(local, dist)  # (N, D), in the order of ``samples``


def compute_activations(
    prefix: nn.Module, samples: Sequence[Sample], spec: PreprocessSpec, *, device: torch.device,
    batch_size: int = 128, workers: int = 0, desc: str = "activations",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(N, C, H, W) float32 outputs of a frozen prefix of the network, eval transform, kept in memory.

    Fine-tuning with the first stages frozen and no augmentation sees the same prefix output for an
    image every epoch, so it is computed once. ``forward`` runs the prefix instead of calling it
    (e.g. ``tl_deploy.train.stage_cache.frozen_forward``'s onnxruntime session).
    """
    chunks = _eval_outputs(prefix, forward or prefix, samples, spec, device=device, batch_size=batch_size,
                           workers=workers, desc=desc)  # (B, C, h, w) each
    return torch.cat(chunks) if chunks else torch.empty(0)


def mirror_transform(spec: PreprocessSpec) -> Transform:
    """The eval transform of the horizontally mirrored image: the eval tensor flipped along its width
    (normalisation is per pixel, so mirroring before or after it gives the same tensor)."""
    plain = eval_transform(spec)

    def transform(image: ImageInput) -> torch.Tensor:
        return plain(image).flip(-1)  # (3, H, W)

    return transform


def view_transform(spec: PreprocessSpec, view: int) -> Transform:
    """View 0: the image; view 1: its mirror image; views 2+: random flip + affine (``train_transform``)."""
    if view == 0:
        return eval_transform(spec)
    return mirror_transform(spec) if view == 1 else train_transform(spec, augment=True)


@torch.no_grad()
def compute_view_features(
    forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, samples: Sequence[Sample],
    spec: PreprocessSpec, *, views: int, seed: int, device: torch.device, batch_size: int = 128,
    desc: str = "views",
) -> torch.Tensor:
    """(N, V, D) features of ``views`` views of every image (``view_transform``), ``module`` in eval mode.

    The random views are drawn from a generator seeded with ``seed`` and the view index, so the same
    call gives the same features; the DataLoader runs in this process to keep that draw in order.
    """
    per_view = []
    for view in range(views):
        torch.manual_seed(seed * 1_000_003 + view)  # torchvision's random transforms draw from torch's generator
        chunks = _eval_outputs(module, lambda x: forward(x).cpu(), samples, spec, device=device,
                               batch_size=batch_size, workers=0, desc=f"{desc} {view + 1}/{views}",
                               transform=view_transform(spec, view))  # (B, D) each
        per_view.append(torch.cat(chunks) if chunks else torch.empty(0))
    return torch.stack(per_view, dim=1)  # (N, V, D)


def cached_features(
    model: nn.Module, model_id: str, samples: Sequence[Sample], spec: PreprocessSpec, *,
    device: torch.device, cache_dir: Path | None, batch_size: int = 128, workers: int = 0,
    desc: str = "features", compute: Callable[[], torch.Tensor] | None = None, dist: DistContext = SINGLE,
) -> torch.Tensor:
    """Features from the on-disk cache, computing and storing them on a miss (rank 0 reads and writes).

    ``compute`` replaces the default computation (``compute_features``) on a miss, e.g. to derive
    the features from prefix activations that are already in memory (every rank holds all of them).
    """
    from safetensors.torch import save_file

    def run() -> torch.Tensor:
        if compute is not None:
            return compute()
        return compute_features(model, samples, spec, device=device, batch_size=batch_size,
                                workers=workers, desc=desc, dist=dist)

    if cache_dir is None:
        return run()
    path = cache_dir / "features" / f"{cache_key(model_id, spec, samples)}.safetensors" if dist.is_main else None
    feats = _read_cache(path, len(samples), desc) if path is not None else None
    if distributed.broadcast_object(feats is not None, dist):
        return distributed.broadcast_tensor(feats, dist)
    feats = run()
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"features": feats.contiguous()}, str(tmp))
    return feats


def _read_cache(path: Path, num_samples: int, desc: str) -> torch.Tensor | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        feats = load_file(str(path))["features"]
        if feats.shape[0] == num_samples:
            _logger.info("%s: %d cached features (%s)", desc, num_samples, path.name)
            return feats
    except Exception as exc:  # a damaged cache entry is recomputed, never trusted
        _logger.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    return None
