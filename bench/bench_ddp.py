"""Data-parallel scaling: training images/s with 1 process vs N torchrun processes (DDP).

Each round launches ``torchrun --nproc_per_node N`` on this script's worker mode, which trains
efficientnet_lite0 (all layers, the ``finetune`` loop of tl_deploy.finetune: same loader, sampler,
DDP wrapper and train_one_epoch) on the same images with the same global batch, and times the epoch
after a warm-up. Process counts are interleaved round by round so machine drift hits all of them.
On CPU the cores are shared: one process gets every core as intra-op threads, N processes get
cores / N threads each.

    python bench/bench_ddp.py                                  # CPU: 1 vs 2 gloo processes
    python bench/bench_ddp.py --device cuda --nprocs 1 2 4 8   # one machine with 8 GPUs (NCCL)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: a warm-up, then one timed epoch; rank 0 writes the figures."""
    import torch
    from torch import nn

    from tl_deploy.backbones import create_model
    from tl_deploy.data import load_splits, train_transform
    from tl_deploy.train import distributed
    from tl_deploy.train.config import TrainConfig
    from tl_deploy.train.loaders import make_loader
    from tl_deploy.train.loop import train_one_epoch
    from tl_deploy.train.optim import build_optimizer, finetune_param_groups, optimizer_kwargs, warmup_cosine

    cfg = TrainConfig(data=str(args.data), batch_size=args.batch_size, img_size=args.img_size, augment=False,
                      device=args.device, workers=0)
    with distributed.process_group(torch.device(args.device)) as ctx:
        splits = load_splits(args.data, verify_images=False)
        samples = splits.train[: args.images]
        model = create_model(cfg.model, num_classes=len(splits.class_names), weights="embedded")
        model = model.to(ctx.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        train_model = distributed.data_parallel(model, ctx, sync_bn=False)
        optimizer = build_optimizer(finetune_param_groups(model, **optimizer_kwargs(cfg)), cfg.optimizer)
        scheduler = warmup_cosine(optimizer, 10_000, 0)
        criterion = nn.CrossEntropyLoss()
        transform = train_transform(cfg.spec(), augment=False)
        warm = make_loader(samples[: 2 * args.batch_size], transform, batch_size=cfg.batch_size, seed=cfg.seed,
                           train=True, epoch=0, dist=ctx)
        train_one_epoch(train_model, warm, optimizer, scheduler, criterion, ctx.device, None, None,
                        "warm-up", bn_eval=True, dist=ctx)
        loader = make_loader(samples, transform, batch_size=cfg.batch_size, seed=cfg.seed, train=True, epoch=1,
                             dist=ctx)
        distributed.barrier(ctx)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_one_epoch(train_model, loader, optimizer, scheduler, criterion, ctx.device, None, None, "timed",
                        bn_eval=True, dist=ctx)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier(ctx)
        seconds = time.perf_counter() - t0
        images = len(samples) // args.batch_size * args.batch_size  # whole global batches
        if ctx.is_main:
            Path(args.result).write_text(json.dumps({
                "processes": ctx.world_size, "backend": ctx.backend or "none", "threads_per_process":
                torch.get_num_threads(), "images": images, "seconds": seconds, "images_per_s": images / seconds}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, args: argparse.Namespace, result: Path) -> dict[str, float]:
    cores = os.cpu_count() or 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), "--worker", "--result", str(result), "--data", str(args.data),
           "--images", str(args.images), "--batch-size", str(args.batch_size), "--img-size", str(args.img_size),
           "--device", args.device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"torchrun --nproc_per_node={nproc} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "animal-shape")
    p.add_argument("--images", type=int, default=512, help="training images per timed epoch")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.nprocs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for n in args.nprocs:
                runs[n].append(launch(n, args, Path(tmp) / f"r{n}.json"))
    best = {n: max(r, key=lambda x: x["images_per_s"]) for n, r in runs.items()}
    base = best[args.nprocs[0]]["images_per_s"]
    print(f"efficientnet_lite0 {args.img_size}px, all layers, global batch {args.batch_size}, {args.images} images, "
          f"{args.device}, {os.cpu_count()} cores, best of {args.rounds} interleaved rounds")
    print("| processes | backend | threads each | images/s | vs first |")
    print("| --- | --- | --- | --- | --- |")
    for n, r in best.items():
        print(f"| {n} | {r['backend']} | {r['threads_per_process']} | {r['images_per_s']:.1f} | "
              f"{r['images_per_s'] / base:.2f}x |")
    print("On a machine with several GPUs: python bench/bench_ddp.py --device cuda --nprocs 1 2 4 8")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "best": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
