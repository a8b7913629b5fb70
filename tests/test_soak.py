"""bench/soak.py: one phase per backend in its own process, slopes and a verdict (no speed or memory asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOAK = ROOT / "bench" / "soak.py"


@pytest.fixture(scope="module")
def soak():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_histogram_percentiles_within_one_percent(soak) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=-3.0, sigma=1.0, size=5000)  # seconds, ~50 ms median
    hist = soak.LatencyHistogram()
    for v in values:
        hist.add(float(v))
    for q in (50, 95, 99):
        exact = float(np.percentile(values, q, method="inverted_cdf")) * 1000
        assert abs(hist.percentile_ms(q) / exact - 1) < 0.011, q
    assert hist.max_s == pytest.approx(values.max())
    assert np.isnan(soak.LatencyHistogram().percentile_ms(50))


def test_slopes_per_min(soak) -> None:  # type: ignore[no-untyped-def]
    t = np.arange(0, 300.0)
    rising = 100 + t / 60 * 2.5
    assert soak.slope_per_min(t, rising) == pytest.approx(2.5)
    assert soak.robust_slope_per_min(t, rising) == pytest.approx(2.5)
    flat_with_spikes = np.full_like(t, 500.0)
    flat_with_spikes[[3, 150, 297, 298]] += 80  # large requests in flight at a few samples
    assert abs(soak.slope_per_min(t, flat_with_spikes)) > 0.3  # least squares tilts
    assert soak.robust_slope_per_min(t, flat_with_spikes) == 0.0
    assert np.isnan(soak.slope_per_min(t[:2], t[:2])) and np.isnan(soak.robust_slope_per_min(t[:2], t[:2]))


def test_plan_one_phase_per_backend(soak, tiny_artifact: Path, export_dir: Path) -> None:  # type: ignore[no-untyped-def]
    phases = soak.plan_phases([str(export_dir), str(tiny_artifact)], None, mixed=True)
    names = [p["name"] for p in phases]
    # every float ONNX file of the export (the baked uint8 file takes other input), the artifact, all mixed
    files = [f["file"] for f in json.loads((export_dir / "export.json").read_text())["files"]]
    assert "model.preprocess.onnx" in files
    assert sorted(names[:3]) == sorted(f"tiny/{f}" for f in ("model.onnx", "model.int8.onnx", "model.int8.cpu.onnx"))
    assert names[3:] == ["tiny", "mixed"]
    assert phases[-1]["load"] == [pair for p in phases[:-1] for pair in p["load"]]
    by_precision = soak.plan_phases([str(export_dir)], ["fp32", "int8"], mixed=False)
    assert [p["load"] for p in by_precision] == [[[str(export_dir), "fp32"]], [[str(export_dir), "int8"]]]


def test_soak_reports_a_slope_per_backend(tiny_artifact: Path, export_dir: Path, tiny_data: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--model", str(export_dir / "model.int8.cpu.onnx"), "--model", str(tiny_artifact),
         "--data", str(tiny_data / "test"), "--seconds", "10", "--warmup", "2", "--threads", "2", "--parallel",
         "--max-slope", "1e9", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("PASSED | 2 phases")
    result = json.loads(out.read_text())
    phases = {p["phase"]: p for p in result["phases"]}
    assert set(phases) == {"tiny/model.int8.cpu.onnx", "tiny"}
    for phase in phases.values():
        assert len(phase["models"]) == 1 and phase["unexpected_errors"] == 0
        assert phase["requests_after_warmup"] > 0 and np.isfinite(phase["rss_slope_mib_per_min"])
    assert phases["tiny"]["models"][0].startswith("torch/")
    assert phases["tiny/model.int8.cpu.onnx"]["models"][0].startswith("onnxruntime/int8")


def test_soak_fails_on_a_slope_above_the_limit(tiny_artifact: Path, tiny_data: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--model", str(tiny_artifact), "--data", str(tiny_data / "test"),
         "--seconds", "6", "--warmup", "1", "--threads", "1", "--max-slope=-1e9", "--json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].startswith("FAILED | ") and "RSS slope" in proc.stdout


def test_soak_refuses_a_missing_model(tmp_path: Path, tiny_data: Path) -> None:
    proc = subprocess.run([sys.executable, str(SOAK), "--model", str(tmp_path / "nope"), "--data", str(tiny_data)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: Model not found: {tmp_path / 'nope'}."
