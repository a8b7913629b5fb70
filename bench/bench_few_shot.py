"""Few-shot accuracy of ``tl-deploy finetune --strategy linear --limit-per-class K``, per seed and the mean.

Runs ``python -m tl_deploy.finetune`` in a subprocess per seed (the embedded Animal-Shape default, a
fresh feature cache, as on a new machine), with the few-shot recipe as its rule chooses it, and with
``--plain`` also the plain linear probe (``--few-shot off``) for comparison; reads test and val
accuracy back from each artifact. Scored on the whole test split (2,000 images).

    python bench/bench_few_shot.py [--shots 10] [--seeds 3] [--plain] [--threads 2]

Target: >= 88% mean test accuracy over seeds 0-2 with 10 labelled images per class.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.88


def run_one(tmp: Path, shots: int, seed: int, threads: int, plain: bool) -> dict[str, float]:
    out = tmp / f"{'plain' if plain else 'recipe'}-{seed}"
    env = dict(os.environ, TL_DEPLOY_CACHE=str(tmp / f"cache-{seed}"))
    cmd = [sys.executable, "-m", "tl_deploy.finetune", "--strategy", "linear", "--limit-per-class", str(shots),
           "--seed", str(seed), "--threads", str(threads), "--device", "cpu", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run([*cmd, *(["--few-shot", "off"] if plain else [])], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    training = json.loads((out / "config.json").read_text())["training"]
    return {"test": metrics["test_acc"], "val": metrics["val_acc"], "wall": wall,
            "few_shot_used": training["few_shot_used"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shots", type=int, default=10, help="labelled training images per class")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plain", action="store_true", help="also run the plain linear probe (--few-shot off)")
    args = p.parse_args()
    subprocess.run([sys.executable, "-m", "tl_deploy.datasets", "animal-shape", "--out", "data/animal-shape"],
                   check=True, capture_output=True)
    kinds = [False, True] if args.plain else [False]
    with tempfile.TemporaryDirectory() as tmp:
        for plain in kinds:
            name = "plain probe (--few-shot off)" if plain else "default (few-shot rule)"
            rows = [run_one(Path(tmp), args.shots, seed, args.threads, plain) for seed in range(args.seeds)]
            for seed, r in enumerate(rows):
                print(f"{name}: {args.shots} per class, seed {seed}: test {100 * r['test']:.2f}%  "
                      f"val {100 * r['val']:.2f}%  {r['wall']:.0f} s wall  few-shot recipe "
                      f"{'on' if r['few_shot_used'] else 'off'}")
            tests = [r["test"] for r in rows]
            mean = statistics.fmean(tests)
            print(f"{name}: mean test {100 * mean:.2f}% (seeds {', '.join(f'{100 * t:.2f}' for t in tests)}), "
                  f"mean val {100 * statistics.fmean(r['val'] for r in rows):.2f}%, "
                  f"mean wall {statistics.fmean(r['wall'] for r in rows):.0f} s ({os.cpu_count()} cores)")
            if not plain:
                print(f"{'PASSED' if mean >= TARGET else 'FAILED'} | mean test accuracy {100 * mean:.2f}% "
                      f"(target >= {100 * TARGET:.0f}%)")


if __name__ == "__main__":
    main()
