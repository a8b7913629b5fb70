"""bench/gpu_check.sh: the parts that need no GPU (syntax, refusals, the offline data, a CPU dry run)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_unknown_option_is_one_error_line(tmp_path: Path) -> None:
    proc = _run("--gpu", str(tmp_path / "work"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown option --gpu")
    assert proc.stderr.count("\n") == 1


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "work"))
    assert proc.returncode == 2
    assert "error: nvidia-smi not found" in proc.stderr and "--cpu-dry-run" in proc.stderr


def test_the_bundled_data_wheel_is_the_published_one() -> None:
    """The script's data come from the working tree, so a GPU machine needs no internet."""
    from tl_deploy.datasets import ANIMAL_WHEEL_NAME, ANIMAL_WHEEL_SHA256

    wheel = ROOT / "bench" / "assets" / ANIMAL_WHEEL_NAME
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == ANIMAL_WHEEL_SHA256
    assert f"bench/assets/{ANIMAL_WHEEL_NAME}" in SCRIPT.read_text()
    assert "pip download" not in SCRIPT.read_text() and "--extra-index-url" not in SCRIPT.read_text()


@pytest.mark.slow
def test_cpu_dry_run_goes_through_every_step(tiny_data: Path, tmp_path: Path) -> None:
    proc = _run("--cpu-dry-run", str(tmp_path / "work"), env={"DATA": str(tiny_data), "OMP_NUM_THREADS": "2"},
                timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-3000:])
    for step in ("machine", "TensorRT", "data", "fine-tune on cpu", "export", "parity", "bench", "done in"):
        assert f"] {step}" in out, step
    assert "SKIPPED | TensorRT FP32/FP16/INT8 engines: --cpu-dry-run" in out
    assert "PASSED | onnx-fp16 | model.fp16.onnx" in out and "fine-tune figures:" in out
    assert out.rstrip().endswith("PASSED | every backend that ran matched PyTorch within its tolerance")
