"""One verification path: parity and bench open exports through the checks ``runtime.load`` applies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tl_deploy.bench import main as bench_main
from tl_deploy.parity import main as parity_main

INT8 = "model.int8.cpu.onnx"


def _copy_export(export_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "project" / "export"
    shutil.copytree(export_dir, out)
    return out


def _edit_entry(export: Path, name: str, **changes: str) -> None:
    manifest_path = export / "export.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(f for f in manifest["files"] if f["file"] == name)
    entry.update(changes)
    manifest_path.write_text(json.dumps(manifest))


def _parity(model: Path, export: Path, data: Path, tmp_path: Path, *extra: str) -> int:
    return parity_main([str(model), "--export", str(export), "--data", str(data), "--backends", "onnx-int8",
                        "--report", str(tmp_path / "reports" / "parity"), *extra])


def _bench(model: Path, export: Path, tmp_path: Path, *extra: str) -> int:
    return bench_main([str(model), "--export", str(export), "--backends", "onnx-int8", "--batch", "1",
                       "--rounds", "1", "--seconds", "0.005", "--warmup", "0", "--limit", "0",
                       "--threads", "1", "--report", str(tmp_path / "reports" / "bench"), *extra])


def test_entry_outside_the_export_folder_is_refused(tiny_artifact: Path, export_dir: Path, tiny_data: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = _copy_export(export_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(export / INT8), elsewhere / INT8)
    _edit_entry(export, INT8, file=f"../../elsewhere/{INT8}")
    assert _parity(tiny_artifact, export, tiny_data, tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'../../elsewhere/model.int8.cpu.onnx'" in err[0]
    assert _bench(tiny_artifact, export, tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a file there" in err[0]
    assert not (tmp_path / "reports").exists()  # nothing certified, nothing benchmarked


def test_wrong_sha256_fails_parity_and_bench(tiny_artifact: Path, export_dir: Path, tiny_data: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = _copy_export(export_dir, tmp_path)
    _edit_entry(export, INT8, sha256="0" * 64)
    assert _parity(tiny_artifact, export, tiny_data, tmp_path) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("FAILED | onnx-int8")]
    assert len(failed) == 1 and "was modified" in failed[0] and "PASSED | onnx-int8" not in out
    assert _bench(tiny_artifact, export, tmp_path) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "was modified" in err[0] and "--no-verify" in err[0]
    assert not (tmp_path / "reports" / "bench.json").exists()
    # The advice works: both accept --no-verify and then use the (unchanged) file.
    assert _parity(tiny_artifact, export, tiny_data, tmp_path, "--no-verify") == 0
    assert "PASSED | onnx-int8" in capsys.readouterr().out
    assert _bench(tiny_artifact, export, tmp_path, "--no-verify") == 0
    assert (tmp_path / "reports" / "bench.json").is_file()


def test_modified_artifact_fails_parity_and_bench(tiny_artifact: Path, export_dir: Path, tiny_data: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_artifact, model)
    metrics = model / "metrics.json"
    metrics.write_text(metrics.read_text() + " ")
    assert _parity(model, export_dir, tiny_data, tmp_path) == 1
    assert "metrics.json was modified" in capsys.readouterr().err
    assert bench_main([str(model), "--export", str(export_dir), "--backends", "torch", "--batch", "1",
                       "--rounds", "1", "--seconds", "0.005", "--warmup", "0", "--limit", "0",
                       "--threads", "1", "--report", str(tmp_path / "reports" / "bench")]) == 1
    assert "metrics.json was modified" in capsys.readouterr().err


# --------------------------------------------------------------------------- checks that say what they did


def test_failed_line_prints_only_the_thresholds_met() -> None:
    from tl_deploy.comparison import DEFAULT_TOLERANCES, BackendResult

    metrics = {"max_abs_logit_diff": 0.5, "agreement": 0.93, "accuracy": 0.90, "accuracy_delta_pt": -0.5}
    line = BackendResult("onnx-int8", "int8", INT8, "failed", DEFAULT_TOLERANCES["int8"],
                         reason="agreement 93.00% < 98%", metrics=metrics).line()
    assert line == ("FAILED | onnx-int8 | model.int8.cpu.onnx | max|dlogit| 5.0e-01, agreement 93.00% < 98%, "
                    "accuracy 90.00% (-0.50 pt, drop <= 1)")
    fp32 = {"max_abs_logit_diff": 2e-3, "agreement": 1.0, "accuracy": 0.8, "accuracy_delta_pt": -2.0}
    line = BackendResult("onnx-fp32", "fp32", "model.onnx", "failed", DEFAULT_TOLERANCES["fp32"],
                         reason="...", problems=["exported from another artifact"], metrics=fp32).line()
    assert line == ("FAILED | onnx-fp32 | model.onnx | max|dlogit| 2.0e-03 > 1e-03, agreement 100.00% >= 100%, "
                    "accuracy 80.00% (-2.00 pt, drop > 0) | exported from another artifact")


@pytest.mark.parametrize("calib_samples,check,warning", [
    (512, "on 24 calibration images (too few images to hold any out)",
     "calibrating on all 24 images in {root} (fewer than the 512 asked); none is left to hold out"),
    (20, "on 4 held-out", "24 images in {root}: 20 calibrate, 4 of the 64 asked are held out for the INT8 check"),
])
def test_int8_check_is_never_skipped_silently(calib_samples: int, check: str, warning: str, tiny_artifact: Path,
                                              tiny_data: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from tl_deploy.export import ExportOptions, export_artifact

    calib = tmp_path / "calib"
    shutil.copytree(tiny_data / "val", calib)  # 24 images: fewer than calibration + held-out asks
    with caplog.at_level("WARNING"):
        rows = export_artifact(tiny_artifact, tmp_path / "export", ExportOptions(
            int8=True, calib_data=calib, calib_samples=calib_samples))
    int8 = [r for r in rows if r.precision == "int8"]
    assert len(int8) == 2 and all(r.check.startswith("top-1 agrees ") and check in r.check for r in int8)
    assert warning.format(root=calib) in caplog.text
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert all(check in f["check"] for f in manifest["files"] if f["precision"] == "int8")
