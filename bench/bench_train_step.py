"""Time the default job's training path, piece by piece, on the machine it runs on.

What fine-tuning really runs: an AdamW step (the fused kernel) of the trained stages of
efficientnet_lite0 on the frozen stages' cached outputs, at 112 px. Prints ms per image of a step for
channels_last against contiguous tensors, batch 32 and 64, and 3 or 4 trained stages (median of
interleaved rounds), then the frozen-stage pass that fills the cache with 0, 1 and 2 DataLoader workers
decoding the images. With ``--compile``: ``torch.compile`` of the trained suffix (4 stages, batch 32,
channels_last), its compile time and steady step against eager in interleaved rounds, and the steps a
job needs before the compile pays back (the default job runs 436).

    python bench/bench_train_step.py [--threads 2] [--rounds 6] [--images 2000] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from tl_deploy.backbones import create_model, set_trainable
from tl_deploy.data import load_splits
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.train.loop import set_train_mode
from tl_deploy.train.optim import build_optimizer, finetune_param_groups
from tl_deploy.train.stage_cache import StageCache, cut_for_cache

CPU = torch.device("cpu")
Config = tuple[int, int, str]  # (trained stages, batch, memory format)


def step_setup(unfreeze: int, fmt: torch.memory_format) -> tuple[nn.Module, torch.Tensor, torch.optim.Optimizer]:
    """The trained suffix, a batch-64 block of its cached inputs and its optimizer."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=10, weights="embedded", drop_rate=0.2)
    cut = cut_for_cache(model, unfreeze, 112, CPU, 8000)
    assert cut is not None
    prefix, suffix = cut
    set_trainable(model, unfreeze)
    with torch.no_grad():
        h = prefix.eval()(torch.randn(64, 3, 112, 112))  # (64, C, h, w)
    model.to(memory_format=fmt)  # type: ignore[call-overload]
    groups = finetune_param_groups(model, lr=1e-3, backbone_lr_mult=0.3, layer_decay=None, weight_decay=0.01)
    return suffix, h, build_optimizer(groups, "adamw")


def time_steps(rounds: int) -> None:
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    configs: list[Config] = [(u, b, f) for u in (3, 4) for b in (32, 64) for f in formats]
    state = {c: step_setup(c[0], formats[c[2]]) for c in configs}
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    times: dict[Config, list[float]] = {c: [] for c in configs}
    for r in range(rounds + 1):  # round 0 warms up
        for c in configs:
            suffix, h, optimizer = state[c]
            x = h[:c[1]].contiguous(memory_format=formats[c[2]])
            y = torch.arange(c[1]) % 10
            set_train_mode(suffix, True)
            start = time.perf_counter()
            for _ in range(3):
                loss = criterion(suffix(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if r:
                times[c].append((time.perf_counter() - start) / 3 / c[1] * 1000)
    print("training step, ms per image (median):")
    for c in configs:
        print(f"  {c[0]} trained stages, batch {c[1]}, {c[2]}: {statistics.median(times[c]):.2f}")


def time_compile(rounds: int, job_steps: int = 436) -> None:
    """Eager against ``torch.compile`` on the default training step: compile seconds and break-even."""
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    runs: dict[str, tuple[nn.Module, torch.Tensor, torch.optim.Optimizer]] = {}
    for name in ("eager", "compiled"):
        suffix, h, optimizer = step_setup(4, torch.channels_last)
        runs[name] = (torch.compile(suffix) if name == "compiled" else suffix, h[:32], optimizer)  # type: ignore[assignment]
    y = torch.arange(32) % 10

    def step(name: str) -> float:
        module, x, optimizer = runs[name]
        set_train_mode(module, True)
        start = time.perf_counter()
        loss = criterion(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    step("eager")
    first = step("compiled")  # compiles the forward and backward graphs
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for name in times:
            times[name].append(statistics.median(step(name) for _ in range(5)))
    eager, compiled = (statistics.median(times[n]) * 1000 for n in ("eager", "compiled"))
    saved = eager - compiled
    print(f"torch.compile: first step {first:.1f} s (compiling), then {compiled:.1f} ms per step against eager "
          f"{eager:.1f} ms ({eager / compiled:.2f}x)")
    if saved > 0:
        steps = (first - compiled / 1000) / (saved / 1000)
        print(f"  pays back after {steps:.0f} steps; the default job runs {job_steps}: "
              f"{'pays back' if steps < job_steps else 'does not pay back'}")
    else:
        print("  no faster than eager: never pays back")


def time_fill(images: int, rounds: int) -> None:
    splits = load_splits(Path("data/animal-shape"), None, 0)
    samples = splits.train[:images]
    spec = PreprocessSpec.for_size(112, 1.0, interpolation="bilinear")
    model = create_model("efficientnet_lite0", num_classes=10, weights="embedded").eval()
    with StageCache(cut_for_cache(model, 4, 112, CPU, 8000), "auto", CPU, 8000) as cache:
        times: dict[int, list[float]] = {w: [] for w in (0, 1, 2)}
        for _ in range(rounds):
            for workers in times:
                start = time.perf_counter()
                cache.outputs(samples, spec, batch_size=128, workers=workers, desc="fill")
                times[workers].append((time.perf_counter() - start) / images * 1000)
        print(f"frozen-stage pass ({cache.prefix_runtime}), decode + prefix, ms per image (median):")
        for workers, t in times.items():
            print(f"  {workers} workers: {statistics.median(t):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--images", type=int, default=2000, help="images of the cache-fill pass")
    p.add_argument("--compile", action="store_true", help="only time torch.compile against eager")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile:
        time_compile(args.rounds)
        return
    time_steps(args.rounds)
    time_fill(args.images, max(1, args.rounds // 3))


if __name__ == "__main__":
    main()
