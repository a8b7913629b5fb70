"""Source-free adaptation of the deployed demo model: adabn vs tent vs shot, per target domain and seed.

    flock /tmp/tl_deploy.bench.lock python bench/bench_adapt.py --threads 2 \
        --targets data/animal-shape-m,data/animal-shape-sketch

Every run is ``tl_deploy.adapt.adapt_artifact`` (what ``tl-deploy adapt`` runs) on the artifact
``--model``, which is only read: the unlabelled images are the target's ``train/`` (at most
``--limit``, evenly spaced, as the verb's default), the labelled ``test/`` is scored before and after.
``adabn`` draws nothing at random, so it runs once per target (std 0). Prints one table row per
(target, method): target test accuracy before and after (mean and std over the seeds), the gain, the
adaptation's own seconds (decoding, the before/after prediction passes and training: what the lineage
records) and the wall seconds of the whole call (plus the two test-set passes and the writing); writes
every run to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tl_deploy.adapt import METHODS, AdaptConfig, adapt_artifact
from tl_deploy.cli import setup_logging

DEMO_MODEL = "models/animal-shape-efficientnet_lite0-lp-ft"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help="the source artifact (read only)")
    p.add_argument("--targets", default="data/animal-shape-m,data/animal-shape-sketch")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=AdaptConfig.limit, help="unlabelled target images per run")
    p.add_argument("--epochs", type=int, default=AdaptConfig.epochs)
    p.add_argument("--lr", type=float, default=None, help="default: each method's own")
    p.add_argument("--pseudo-label-weight", type=float, default=AdaptConfig.pseudo_label_weight)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/adapt/bench", help="where the adapted artifacts go (replaced)")
    p.add_argument("--report", default="/tmp/adapt/bench_adapt.json")
    args = p.parse_args()
    setup_logging(False)
    torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    rows: list[str] = []
    header = (f"{'target':<22} {'method':<6} {'runs':>4} {'before %':>9} {'after %':>15} {'gain pt':>8} "
              f"{'adapt s':>8} {'wall s':>7}")
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            seeds = [0] if method == "adabn" else list(range(args.seeds))
            group = []
            for seed in seeds:
                cfg = replace(AdaptConfig(), method=method, seed=seed, limit=args.limit, epochs=args.epochs,
                              lr=args.lr, pseudo_label_weight=args.pseudo_label_weight if method == "shot" else 0.0)
                out = Path(args.out) / f"{Path(target).name}-{method}-{seed}"
                start = time.perf_counter()
                result = adapt_artifact(Path(args.model), Path(target), cfg, out, device="cpu", force=True)
                wall = time.perf_counter() - start
                run = {"target": target, "method": method, "seed": seed, "settings": cfg.to_dict(),
                       "acc_before": result.test_acc_before, "acc_after": result.test_acc_after,
                       "adapt_seconds": result.lineage["seconds"], "wall_seconds": round(wall, 2),
                       "collapse": result.collapse, "stats_after": result.after.to_dict()}
                print(json.dumps({k: run[k] for k in ("target", "method", "seed", "acc_before", "acc_after",
                                                     "adapt_seconds", "wall_seconds")}), flush=True)
                runs.append(run)
                group.append(run)
            before = 100 * statistics.fmean(r["acc_before"] for r in group)
            after, after_std = _mean_std([100 * r["acc_after"] for r in group])
            rows.append(f"{Path(target).name:<22} {method:<6} {len(group):>4} {before:>9.2f} "
                        f"{after:>8.2f} ± {after_std:<4.2f} {after - before:>+8.2f} "
                        f"{statistics.fmean(r['adapt_seconds'] for r in group):>8.1f} "
                        f"{statistics.fmean(r['wall_seconds'] for r in group):>7.1f}")
    print()
    print(header)
    print("\n".join(rows))
    report = {"model": args.model, "threads": args.threads, "limit": args.limit, "cpu": platform.processor(),
              "load_average": os.getloadavg(), "runs": runs, "table": [header, *rows]}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
