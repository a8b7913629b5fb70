"""Unsupervised domain adaptation with the default pipeline: source-only vs each ``--da`` method, on
every target domain.

    python -m tl_deploy.datasets animal-shape-m --out data/animal-shape-m
    python -m tl_deploy.datasets animal-shape-sketch --out data/animal-shape-sketch
    flock /tmp/tl_deploy.bench.lock python bench/bench_da.py --seeds 0 --methods source-only,mcc

Every run is ``tl-deploy finetune`` (in-process) with its defaults (full Animal-Shape source, 112 px,
lp-ft, 2 epochs) and ``--threads``; a DA run adds ``--target-unlabeled TARGET --da METHOD`` (all of
TARGET/train/, unlabelled). The model of the best *source* val epoch is kept; target labels are read
only to score the target's test/ split after training. The source-only model does not depend on the
target: it is trained once per seed and scored on every target's test/ (``evaluate_artifact``).

Each invocation runs the (method, seed, target) runs it is given, adds them to ``--json`` (a run
already there is replaced), and prints the table over every run in the file: per method, target
test accuracy on each domain and source test accuracy (mean ± std over seeds), the wall time of the
``fit`` call, and its ratio to the source-only run of the same seed. So the bench can be run in
parts that each fit a time slot, and ``--report`` prints the table without running anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tl_deploy.artifact import Artifact, load_artifact
from tl_deploy.cli import setup_logging
from tl_deploy.data import ImageDataset, eval_transform
from tl_deploy.errors import TlDeployError
from tl_deploy.train.adaptation import DA_METHODS, target_test_samples
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.loop import predict_logits, summarize
from tl_deploy.train.recipe import fit

SOURCE_ONLY = "source-only"


def target_test_acc(artifact: Artifact, target: str) -> float:
    """Accuracy of ``artifact`` on ``target``/test/ (the labelled split the DA runs score too)."""
    samples = target_test_samples(target, artifact.class_names)
    if not samples:
        raise SystemExit(f"error: {target}/test/ is missing or has other classes than {artifact.class_names}")
    loader = torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(artifact.spec)), batch_size=128)
    logits, labels = predict_logits(artifact.model, loader, torch.device("cpu"), amp=None, desc="target test eval")
    return summarize(logits, labels, len(artifact.class_names)).accuracy


def run_source_only(source: str, targets: list[str], seed: int, threads: int, out: Path) -> list[dict[str, Any]]:
    """One source-only fit (scored on the first target's test/ by the run itself), then the artifact
    scored on every other target's test/."""
    cfg = TrainConfig(data=source, seed=seed, threads=threads, target_unlabeled=targets[0],
                      out=str(out / f"{SOURCE_ONLY}-{seed}"))
    t0 = time.perf_counter()
    path = fit(cfg)
    seconds = time.perf_counter() - t0
    metrics = json.loads((path / "metrics.json").read_text())
    artifact = load_artifact(path)
    rows = []
    for target in targets:
        acc = (metrics["target_test_acc"] if target == targets[0]
               else target_test_acc(artifact, target))
        rows.append({"method": SOURCE_ONLY, "seed": seed, "target": Path(target).name, "target_test_acc": acc,
                     "source_test_acc": metrics["test_acc"], "source_val_acc": metrics["val_acc"],
                     "seconds": round(seconds, 1)})
    return rows


def run_da(source: str, target: str, method: str, seed: int, threads: int, out: Path) -> dict[str, Any]:
    cfg = TrainConfig(data=source, seed=seed, threads=threads, target_unlabeled=target, da=method,
                      out=str(out / f"{method}-{Path(target).name}-{seed}"))
    t0 = time.perf_counter()
    try:
        path = fit(cfg)
    except TlDeployError as exc:  # every epoch collapsed: the run refuses to write a model
        return {"method": method, "seed": seed, "target": Path(target).name, "target_test_acc": None,
                "source_test_acc": None, "seconds": round(time.perf_counter() - t0, 1), "failed": str(exc)}
    seconds = time.perf_counter() - t0
    metrics = json.loads((path / "metrics.json").read_text())
    stats = metrics.get("target_unlabeled_stats", {})
    return {"method": method, "seed": seed, "target": Path(target).name, "target_test_acc": metrics["target_test_acc"],
            "source_test_acc": metrics["test_acc"], "source_val_acc": metrics["val_acc"],
            "seconds": round(seconds, 1), "target_entropy": stats.get("mean_entropy"),
            "target_effective_classes": stats.get("effective_classes"),
            "target_agreement": stats.get("agreement"), "collapsed_epochs": stats.get("collapsed_epochs")}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def print_table(runs: list[dict[str, Any]]) -> None:
    """Markdown table over ``runs``: one row per method, mean ± std over its seeds."""
    names = list(dict.fromkeys(r["target"] for r in runs))  # the targets, in the order first run
    methods = [m for m in (SOURCE_ONLY, *DA_METHODS) if any(r["method"] == m for r in runs)]
    baseline = {r["seed"]: r["seconds"] for r in runs if r["method"] == SOURCE_ONLY}
    print("| method | seeds | " + " | ".join(f"target test acc ({n})" for n in names)
          + " | source test acc | wall s | wall / source-only |")
    print("| --- " * (len(names) + 5) + "|")
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        cells = []
        for name in names:
            vals = [100 * r["target_test_acc"] for r in rows if r["target"] == name and not r.get("failed")]
            failed = sum(1 for r in rows if r["target"] == name and r.get("failed"))
            note = f" ({failed} run(s) collapsed: no model)" if failed else ""
            cells.append((mean_std(vals) if vals else "-") + note)
        per_run = [r for r in {(r["seed"], r["target"]): r for r in rows}.values()  # source-only: one fit per seed
                   if not r.get("failed")]
        seeds = sorted({r["seed"] for r in rows})
        source = mean_std([100 * r["source_test_acc"] for r in per_run]) if per_run else "-"
        walls = [r["seconds"] for r in per_run]
        ratios = [r["seconds"] / baseline[r["seed"]] for r in per_run if r["seed"] in baseline]
        ratio = f"{statistics.fmean(ratios):.2f}x (max {max(ratios):.2f}x)" if ratios else "-"
        if method == SOURCE_ONLY:
            source = mean_std([100 * r["source_test_acc"] for r in rows if r["target"] == names[0]])
            walls = [r["seconds"] for r in rows if r["target"] == names[0]]
            ratio = "1.00x"
        print(f"| {method} | {','.join(map(str, seeds))} | " + " | ".join(cells)
              + f" | {source} | {statistics.fmean(walls) if walls else float('nan'):.0f} | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="data/animal-shape")
    p.add_argument("--targets", default="data/animal-shape-m,data/animal-shape-sketch",
                   help="comma-separated target folders, each with train/ (unlabelled here) and a labelled test/; "
                        "the DA methods run on each, the source-only model is scored on each")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--methods", default=f"{SOURCE_ONLY},mcc", help=f"comma-separated: {SOURCE_ONLY}, "
                                                                  f"{', '.join(DA_METHODS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/tl_deploy-bench-da", help="folder of the runs' artifacts")
    p.add_argument("--json", default="bench/results/da.json", help="runs so far; this invocation's are added")
    p.add_argument("--report", action="store_true", help="only print the table of the runs in --json")
    args = p.parse_args()
    setup_logging(False)
    torch.set_num_threads(args.threads)
    targets = args.targets.split(",")
    store = Path(args.json)
    runs: list[dict[str, Any]] = json.loads(store.read_text())["runs"] if store.is_file() else []
    if not args.report:
        out = Path(args.out)
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in args.methods.split(","):
                for target in [None] if method == SOURCE_ONLY else targets:
                    new = (run_source_only(args.source, targets, seed, args.threads, out) if target is None
                           else [run_da(args.source, target, method, seed, args.threads, out)])
                    for row in new:
                        print(json.dumps(row), flush=True)
                        runs = [r for r in runs if (r["method"], r["seed"], r["target"])
                                != (row["method"], row["seed"], row["target"])] + [row]
                    store.parent.mkdir(parents=True, exist_ok=True)
                    store.write_text(json.dumps({"source": args.source, "threads": args.threads, "runs": runs},
                                                indent=2))
    print(f"\n{args.source} -> each target; default pipeline (112 px, lp-ft, 2 epochs), --threads "
          f"{args.threads}; mean ± std over seeds")
    print_table(runs)


if __name__ == "__main__":
    main()
