"""Unsupervised domain adaptation on Animal-Shape -> Animal-Shape-M: source-only vs DANN vs MMD vs CORAL.

    python -m tl_deploy.datasets animal-shape-m --out data/animal-shape-m
    flock /tmp/tl_deploy.bench.lock python bench/bench_da.py --target data/animal-shape-m

Every run is ``python -m tl_deploy.finetune`` (in-process) on labelled Animal-Shape training images
plus, for the DA methods, unlabelled Animal-Shape-M training images; the model of the best
*source* val epoch is kept; target test accuracy is read from the artifact's metrics. Prints a table
of mean and std over the seeds and writes every run to ``--json``.

To fit a few CPU minutes, both datasets are cut to fixed, class-balanced subsets first (symlinks,
first files of each class folder in name order, the same for every method and seed):
``--source-per-class`` training images (of which each seed's run uses ``--limit-per-class``), 20 val
and ``--test-per-class`` test images per class; the target keeps ``--target-per-class`` unlabelled
training images and ``--test-per-class`` labelled test images per class.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tl_deploy.cli import setup_logging
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.recipe import fit

METHODS = ("source-only", "dann", "mmd", "coral")


def subset_tree(src: Path, dst: Path, per_split: dict[str, int]) -> Path:
    """Symlinked ImageFolder with the first N files of each class of each split (name order)."""
    for split, n in per_split.items():
        for class_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            out = dst / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(class_dir.iterdir())[:n]:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="data/animal-shape")
    p.add_argument("--target", default="data/animal-shape-m")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--limit-per-class", type=int, default=50, help="labelled source images per class and run")
    p.add_argument("--source-per-class", type=int, default=100)
    p.add_argument("--target-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--strategy", default="lp-ft")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--opt", default="adamw")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--da-weight", type=float, default=1.0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest when the cores are shared)")
    p.add_argument("--out", default="/tmp/tl_deploy-bench-da")
    p.add_argument("--json", default="bench/results/da.json")
    args = p.parse_args()
    setup_logging(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.out)
    source = subset_tree(Path(args.source), work / "source",
                         {"train": args.source_per_class, "val": 20, "test": args.test_per_class})
    target = subset_tree(Path(args.target), work / "target",
                         {"train": args.target_per_class, "test": args.test_per_class})
    runs = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        for method in args.methods.split(","):
            da = None if method == "source-only" else method
            cfg = TrainConfig(data=str(source), strategy=args.strategy, epochs=args.epochs, img_size=args.img_size,
                              limit_per_class=args.limit_per_class, seed=seed, da=da, da_weight=args.da_weight,
                              optimizer=args.opt, lr=args.lr, unfreeze="all", augment=True,
                              target_unlabeled=str(target), out=f"{args.out}/runs/{method}-{seed}")
            t0 = time.perf_counter()
            metrics = json.loads((fit(cfg) / "metrics.json").read_text())
            runs.append({"method": method, "seed": seed, "target_test_acc": metrics["target_test_acc"],
                         "source_test_acc": metrics["test_acc"], "source_val_acc": metrics["val_acc"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(runs[-1]), flush=True)
    wall = time.perf_counter() - start
    print(f"\n{args.seeds} seeds, {args.strategy}, {args.epochs} epochs, {args.opt} lr {args.lr}, {args.img_size} px, "
          f"{args.limit_per_class} labelled source images per class, {args.target_per_class} unlabelled target "
          f"images per class, {args.test_per_class} test images per class, da weight {args.da_weight}; "
          f"wall {wall:.0f} s")
    print("| method | target test acc (Animal-Shape-M) | source test acc (Animal-Shape) |")
    print("| --- | --- | --- |")
    for method in args.methods.split(","):
        rows = [r for r in runs if r["method"] == method]
        cells = []
        for key in ("target_test_acc", "source_test_acc"):
            vals = [100 * r[key] for r in rows]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.fmean(vals):.1f} ± {std:.1f}")
        print(f"| {method} | {cells[0]} | {cells[1]} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "wall_seconds": wall}, indent=2))


if __name__ == "__main__":
    main()
