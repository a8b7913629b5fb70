"""Fault injection: kill -9 fine-tuning and export at random moments, resume, count what was lost.

    python bench/fault_injection.py --trials 10 --export-trials 10

Fine-tuning (tiny model, tiny generated data, deterministic): each trial starts a fresh run, kills it
with SIGKILL at a random moment within the length of an uninterrupted run, and resumes with
``--resume`` (killing again with probability 1/2, at most 3 kills a trial) until it completes; the
final weights must equal the uninterrupted run's. Between kills, the output folder must either not
exist or load with its checksums verified.

Export: each trial copies a complete export folder into place, re-exports over it and kills the
export at a random moment; the folder must afterwards load and verify (the old or the new export,
never a mix).

Prints the counts (faults injected, files lost, torn files) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_MODEL, TINY_SIZE, make_image_folder  # noqa: E402
from tl_deploy.errors import TlDeployError  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "tl_deploy.finetune", "--data", str(data), "--model", TINY_MODEL,
            "--weights", "none", "--img-size", str(TINY_SIZE), "--strategy", "lp-ft", "--unfreeze", "all",
            "--probe-epochs", "3",
            "--epochs", str(epochs), "--batch-size", "8", "--lr", "1e-2", "--backbone-lr-mult", "1.0",
            "--no-augment", "--warmup-epochs", "0.5", "--no-cache", "--workers", "0", "--deterministic",
            "--out", str(out)]


def export_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tl_deploy.export", str(model), "--out", str(out), "--int8", "--calib-samples", "24"]


def run_and_kill(cmd: list[str], after: float | None) -> tuple[bool, float]:
    """Run ``cmd``; SIGKILL it ``after`` seconds in (None: let it finish). Returns (was killed, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if after is not None:
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=900)
    killed = proc.returncode == -signal.SIGKILL
    if not killed and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed with {proc.returncode}: {err[-1500:]}")
    return killed, time.perf_counter() - start


def weights(path: Path) -> dict[str, Any]:
    from tl_deploy.artifact import load_artifact

    return load_artifact(path).model.state_dict()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loads_whole_or_absent(path: Path, loader: Any) -> str:
    """'absent', 'whole' (loads with checksums verified) or 'torn' (exists but does not load)."""
    if not path.exists():
        return "absent"
    try:
        loader(path)
    except TlDeployError:
        return "torn"
    return "whole"


def stray_temp_folders(folder: Path) -> int:
    """Hidden temporary folders a kill left behind (never read by loading the real path)."""
    return sum(1 for p in folder.iterdir() if p.is_dir() and p.name.startswith(".") and p.name.endswith(".tmp"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10, help="fine-tuning trials")
    p.add_argument("--export-trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fault_injection.json")
    args = p.parse_args()
    rng = random.Random(args.seed)
    from tl_deploy.artifact import load_artifact
    from tl_deploy.runtime import load

    with tempfile.TemporaryDirectory(prefix="tl_deploy_faults_") as tmp_name:
        tmp = Path(tmp_name)
        data = make_image_folder(tmp / "data", {"train": 24, "val": 8, "test": 8})
        ref = tmp / "reference"
        _, ref_seconds = run_and_kill(train_cmd(data, ref, args.epochs), None)
        reference = weights(ref)
        print(f"uninterrupted run: {ref_seconds:.1f} s")

        kills, lost, torn_seen = 0, 0, 0
        trials: list[dict[str, Any]] = []
        for trial in range(args.trials):
            out = tmp / f"run{trial}"
            times: list[float] = []
            resume: list[str] = []
            for attempt in range(4):
                kill_at = rng.uniform(0.0, ref_seconds) if attempt == 0 or (attempt < 3 and rng.random() < 0.5) \
                    else None
                killed, _ = run_and_kill(train_cmd(data, out, args.epochs) + resume, kill_at)
                state = loads_whole_or_absent(out, load_artifact)
                torn_seen += state == "torn"
                if killed:
                    kills += 1
                    times.append(round(kill_at or 0.0, 2))
                    resume = ["--resume"]
                    continue
                break
            equal = same(weights(out), reference)
            lost += not equal
            trials.append({"kills_at_s": times, "final_equals_uninterrupted": equal})
            print(f"train trial {trial}: killed at {times} s -> final weights equal: {equal}")

        model = tmp / "reference"
        base = tmp / "export_base"
        _, export_seconds = run_and_kill(export_cmd(model, base), None)
        export_kills, export_torn, export_lost = 0, 0, 0
        for trial in range(args.export_trials):
            out = tmp / "export"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(base, out)
            killed, _ = run_and_kill(export_cmd(model, out), rng.uniform(0.0, export_seconds))
            export_kills += killed
            state = loads_whole_or_absent(out, load)
            export_torn += state == "torn"
            export_lost += state == "absent"
            print(f"export trial {trial}: killed={killed} -> folder {state}")
        stray = stray_temp_folders(tmp)

    result = {
        "train": {"trials": args.trials, "kills": kills, "final_weights_differ": lost,
                  "torn_artifacts_seen": torn_seen, "uninterrupted_s": round(ref_seconds, 1), "detail": trials},
        "export": {"trials": args.export_trials, "kills": export_kills, "torn_folders": export_torn,
                   "folders_lost": export_lost, "uninterrupted_s": round(export_seconds, 1)},
        "stray_temp_folders_left": stray,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    bad = lost + torn_seen + export_torn + export_lost
    print(f"{'PASSED' if not bad else 'FAILED'} | {kills + export_kills} kill -9 faults injected "
          f"({kills} training, {export_kills} export): runs whose final weights differ {lost}, "
          f"torn outputs {torn_seen + export_torn}, exports lost {export_lost}; hidden temp folders left "
          f"behind {stray} (never loaded)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
