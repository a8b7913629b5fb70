"""Time the default demo's main job and report its test accuracy.

Runs ``python -m tl_deploy.finetune`` (the embedded default: Animal-Shape, efficientnet_lite0, lp-ft)
in a subprocess with the data already prepared and the environment installed, then reads the test
accuracy back from the artifact.

    python bench/bench_demo.py [--keep-cache] [-- extra finetune args]

Targets: <= 300 s wall clock on a 2-core machine, >= 98% test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep-cache", action="store_true",
                   help="reuse the feature cache (default: a fresh cache, as on a new machine)")
    p.add_argument("--out", type=Path, help="keep the artifact here (default: a temporary folder)")
    p.add_argument("extra", nargs="*", help="extra arguments for tl_deploy.finetune")
    args = p.parse_args()
    subprocess.run([sys.executable, "-m", "tl_deploy.datasets", "animal-shape", "--out", "data/animal-shape"],
                   check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if not args.keep_cache:
            env["TL_DEPLOY_CACHE"] = str(Path(tmp) / "cache")
        out = args.out or Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tl_deploy.finetune", "--out", str(out), *args.extra],
                       check=True, env=env)
        wall = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
    acc = metrics["test_acc"]
    print(f"demo main job: {wall:.0f} s wall ({os.cpu_count()} cores), test accuracy {acc * 100:.2f}%, "
          f"val {metrics['val_acc'] * 100:.2f}%")
    phases = metrics.get("phase_seconds", {})
    epochs = [row["seconds"] for row in metrics["history"] if "seconds" in row]
    print("  " + ", ".join(f"{name} {sec:.0f} s" for name, sec in phases.items())
          + f" (epochs {' + '.join(f'{s:.0f}' for s in epochs)} s); start-up and writing the artifact "
          f"{wall - metrics['train_seconds']:.0f} s")
    print(f"{'PASSED' if wall <= 300 else 'FAILED'} | time {wall:.0f} s (target <= 300 s)")
    print(f"{'PASSED' if acc >= 0.98 else 'FAILED'} | accuracy {acc * 100:.2f}% (target >= 98%)")


if __name__ == "__main__":
    main()
