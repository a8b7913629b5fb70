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
                       "--rounds", "1", "--seconds", "0.005", "--warmup", "0", "--e2e-images", "0",
                       "--threads", "1", "--out", str(tmp_path / "reports" / "bench"), *extra])


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
                       "--rounds", "1", "--seconds", "0.005", "--warmup", "0", "--e2e-images", "0",
                       "--threads", "1", "--out", str(tmp_path / "reports" / "bench")]) == 1
    assert "metrics.json was modified" in capsys.readouterr().err
