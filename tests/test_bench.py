"""Bench: the structure of its results with tiny settings (nothing here asserts a speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tl_deploy.bench import E2E, BenchConfig, interleaved, main, run_bench
from tl_deploy.errors import TlDeployError
from tl_deploy.export import ExportOptions, export_artifact

TINY = BenchConfig(batches=(1, 3), rounds=2, seconds=0.005, warmup=1, e2e_images=2)


@pytest.fixture(scope="module")
def export_dir(tiny_artifact: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    export_artifact(tiny_artifact, out, ExportOptions(int8=True, calib_data=tiny_data, calib_samples=24))
    return out


def test_interleaved_times_every_function_and_ratios_to_torch() -> None:
    calls = {"torch": 0, "other": 0}

    def count(name: str):  # type: ignore[no-untyped-def]
        def fn() -> None:
            calls[name] += 1
        return fn

    timings = interleaved({"torch": count("torch"), "other": count("other")}, 4,
                          BenchConfig(rounds=3, seconds=0.001, warmup=2))
    assert timings["torch"].vs_torch == 1.0 and timings["other"].vs_torch is not None
    for name, t in timings.items():
        assert t.calls >= 3 and calls[name] == t.calls + 2 + 3  # timed + warm-up + probe
        assert 0 < t.p50_ms <= t.p90_ms <= t.p99_ms and t.images_per_s > 0


def test_run_bench_structure(tiny_artifact: Path, export_dir: Path, tiny_data: Path) -> None:
    report = run_bench(tiny_artifact, export_dir, backends=["torch", "torch-cudagraph", "onnx-fp32", "onnx-int8",
                                                           "trt-fp32"],
                       config=TINY, threads=1, device="cpu", data=tiny_data)
    status = {row["backend"]: row["status"] for row in report.backends}
    assert status == {"torch": "ok", "torch-cudagraph": "skipped", "onnx-fp32": "ok", "onnx-int8": "ok",
                      "trt-fp32": "skipped"}
    assert all(row["reason"] for row in report.backends if row["status"] == "skipped")
    assert list(report.timings) == ["1", "3", E2E]
    for rows in report.timings.values():
        assert list(rows) == ["torch", "onnx-fp32", "onnx-int8"]
        assert rows["torch"].vs_torch == 1.0
        assert all(t.calls >= TINY.rounds and t.p50_ms <= t.p99_ms and t.images_per_s > 0 for t in rows.values())
    assert "2 files" in report.e2e_note and report.threads == 1 and report.device == "cpu"


def test_cli_writes_json_and_png(tiny_artifact: Path, export_dir: Path, tiny_data: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    stem = tmp_path / "out" / "bench"
    code = main([str(tiny_artifact), "--export", str(export_dir), "--backends",
                 "torch,onnx-fp32", "trt-int8", "--batch", "2", "--rounds", "1", "--seconds", "0.005",
                 "--warmup", "0", "--limit", "0", "--threads", "1", "--report", str(stem)])
    out = capsys.readouterr().out
    assert code == 0 and "vs torch" in out and "SKIPPED | trt-int8 |" in out
    result = json.loads((stem.parent / "bench.json").read_text())
    assert list(result["timings"]) == ["2"] and set(result["timings"]["2"]) == {"torch", "onnx-fp32"}
    assert set(result["timings"]["2"]["torch"]) == {"p50_ms", "p90_ms", "p99_ms", "images_per_s", "calls", "vs_torch"}
    assert result["end_to_end_images"].startswith("skipped") and result["config"]["batches"] == [2]
    assert (stem.parent / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_are_refused(tiny_artifact: Path, export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TlDeployError, match="positive batch sizes"):
        BenchConfig(batches=(0,))
    with pytest.raises(TlDeployError, match="rounds >= 1"):
        BenchConfig(rounds=0)
    assert main([str(tiny_artifact), "--export", str(export_dir), "--batch", "1,x"]) == 2  # a usage error
    assert "Invalid --batch '1,x'" in capsys.readouterr().err
