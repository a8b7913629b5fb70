"""Linear probe: an epoch on cached features vs an epoch of the naive frozen-backbone loop.

The naive loop (the seed article's recipe) re-runs the frozen backbone on every image in every
epoch; tl_deploy computes the features once and trains the head on the cache. Both epochs are
measured side by side in this run, on the same images, threads and head.

    python bench/bench_linear_cache.py [--data data/animal-shape] [--images 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from tl_deploy.backbones import create_model, pooled_features
from tl_deploy.data import ImageDataset, eval_transform, load_splits
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.train.feature_cache import compute_features


def naive_epoch(model: nn.Module, head: nn.Linear, loader: torch.utils.data.DataLoader,
                opt: torch.optim.Optimizer) -> float:
    """The frozen-backbone loop that re-runs the backbone for every batch (no cache)."""
    start = time.perf_counter()
    for x, y in loader:
        with torch.no_grad():
            feats = pooled_features(model, x.contiguous(memory_format=torch.channels_last))  # (B, D)
        loss = nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def cached_epoch(feats: torch.Tensor, labels: torch.Tensor, head: nn.Linear, opt: torch.optim.Optimizer,
                 batch_size: int) -> float:
    start = time.perf_counter()
    order = torch.randperm(len(feats))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        loss = nn.functional.cross_entropy(head(feats[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/animal-shape"))
    p.add_argument("--images", type=int, default=2000, help="training images used (0: all)")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    splits = load_splits(args.data, verify_images=False)
    samples = splits.train[: args.images] if args.images else splits.train
    spec = PreprocessSpec(input_size=args.img_size, resize=args.img_size)
    model = create_model("efficientnet_lite0", num_classes=len(splits.class_names), weights="embedded").eval()
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    head = nn.Linear(model.num_features, len(splits.class_names))  # type: ignore[arg-type]
    opt = torch.optim.AdamW(head.parameters(), 1e-3)
    loader = torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(spec)), batch_size=args.batch_size,
                                         shuffle=True)
    labels = torch.tensor([label for _, label in samples])
    t0 = time.perf_counter()
    feats = compute_features(model, samples, spec, device=torch.device("cpu"), desc="cache fill")
    fill = time.perf_counter() - t0
    naive, cached = [], []
    for _ in range(args.repeats):  # interleaved so machine drift hits both
        naive.append(naive_epoch(model, head, loader, opt))
        cached.append(cached_epoch(feats, labels, head, opt, args.batch_size))
    n, c = min(naive), min(cached)
    result = {"images": len(samples), "img_size": args.img_size, "threads": torch.get_num_threads(),
              "naive_epoch_s": n, "cache_fill_s": fill, "cached_epoch_s": c, "cached_over_naive": c / n,
              "target": "cached epoch <= 1/20 of a naive epoch", "passed": c <= n / 20}
    print(f"images {len(samples)} at {args.img_size}px, {torch.get_num_threads()} threads")
    print(f"naive frozen-backbone epoch   {n:8.3f} s")
    print(f"cache fill (once)             {fill:8.3f} s")
    print(f"cached-feature epoch          {c:8.4f} s   = 1/{n / c:.0f} of naive "
          f"({'PASSED' if c <= n / 20 else 'FAILED'}: target <= 1/20)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
