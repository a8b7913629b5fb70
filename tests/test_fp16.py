"""FP16 ONNX: ``export --fp16`` writes and verifies model.fp16.onnx; it is a backend of its own."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from tl_deploy.errors import ExportError
from tl_deploy.export import FP16_TOL, ExportOptions, export_artifact
from tl_deploy.export.__main__ import main
from tl_deploy.formats.names import FP16_FILE


@pytest.fixture(scope="module")
def fp16_export(tiny_artifact: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "tiny"
    export_artifact(tiny_artifact, out, ExportOptions(fp16=True, calib_data=tiny_data))
    return out


def test_fp16_file_is_float16_inside_with_float32_io(fp16_export: Path) -> None:
    model = onnx.load(str(fp16_export / FP16_FILE))
    float32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [float32, float32]
    weights = [i for i in model.graph.initializer if len(i.dims) >= 2]  # conv and linear weights
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert (fp16_export / FP16_FILE).stat().st_size < 0.6 * (fp16_export / "model.onnx").stat().st_size
    from tl_deploy.formats.metadata import read_onnx_metadata

    assert read_onnx_metadata(str(fp16_export / FP16_FILE)).precision == "fp16"


def test_fp16_file_is_verified_and_listed(fp16_export: Path) -> None:
    manifest = json.loads((fp16_export / "export.json").read_text())
    entry = next(f for f in manifest["files"] if f["file"] == FP16_FILE)
    assert entry["precision"] == "fp16" and entry["kind"] == "onnx" and entry["status"] == "ok"
    assert len(entry["sha256"]) == 64 and entry["fp16_nodes"] > 0 and entry["fp32_nodes"] == {}
    assert "vs model.onnx" in entry["check"] and "held-out images" in entry["check"]  # real images, not noise


def test_fp16_runs_on_onnxruntime_close_to_fp32(fp16_export: Path, tiny_data: Path) -> None:
    from tl_deploy.runtime import load

    half = load(fp16_export, backend="onnxruntime", precision="fp16", threads=1)
    full = load(fp16_export / "model.onnx", threads=1)
    assert half.precision == "fp16" and half.source.name == FP16_FILE and half.backend_name == "onnxruntime"
    x = full.preprocess(sorted((tiny_data / "test").rglob("*.png")))
    diff = np.abs(half.infer(x) - full.infer(x))
    assert 0 < diff.max() <= FP16_TOL  # really reduced precision, and close
    assert load(fp16_export).source.name != FP16_FILE  # auto does not pick FP16 on a CPU


def test_parity_holds_onnx_fp16_to_fp16_tolerances(tiny_artifact: Path, fp16_export: Path, tiny_data: Path) -> None:
    from tl_deploy.comparison import DEFAULT_TOLERANCES
    from tl_deploy.parity import run_parity

    report = run_parity(tiny_artifact, fp16_export, data=tiny_data, backends=["onnx-fp16"], threads=1)
    (result,) = report.results
    assert result.status == "passed", result.line()
    assert result.tolerance == DEFAULT_TOLERANCES["fp16"] and result.line().startswith("PASSED | onnx-fp16 | ")


def test_catalog_bench_and_app_know_onnx_fp16(fp16_export: Path, tiny_artifact: Path, tiny_data: Path) -> None:
    from tl_deploy import model_card
    from tl_deploy.bench import DEFAULT_BACKENDS
    from tl_deploy.runtime.catalog import export_backend_name, resolve_backends

    assert "onnx-fp16" in DEFAULT_BACKENDS
    assert export_backend_name({"kind": "onnx", "precision": "fp16", "input_layout": "float32_nchw"}) == "onnx-fp16"
    (missing,) = resolve_backends(["onnx-fp16"], [], model_dir="models/m", tensorrt_problem=None, cuda_problem=None)
    assert "python -m tl_deploy.export models/m --fp16" in missing.skip_reason
    labels = [e.label for e in model_card.available_engines(fp16_export, tensorrt_ok=False, torch_ok=False)]
    assert "ONNX Runtime FP16" in labels


def test_wrong_fp16_conversion_is_refused_and_nothing_written(tiny_artifact: Path, tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import tl_deploy.export as export
    from tl_deploy.export.fp16 import onnx_to_fp16_onnx

    def broken(source: Path, dest: Path) -> Any:
        result = onnx_to_fp16_onnx(source, dest)
        model = onnx.load(str(dest))
        weight = next(i for i in model.graph.initializer if len(i.dims) == 4)
        weight.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(weight), weight.name))
        onnx.save(model, str(dest))
        return result

    monkeypatch.setattr(export, "onnx_to_fp16_onnx", broken)
    out = tmp_path / "export" / "tiny"
    with pytest.raises(ExportError, match=r"model.fp16.onnx logits differ from model.onnx by .* export without --fp16"):
        export_artifact(tiny_artifact, out, ExportOptions(fp16=True, calib_data=tiny_data))
    assert not out.exists() and list((tmp_path / "export").iterdir()) == []


def test_cli_without_the_converter_is_one_error_line(tiny_artifact: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    real_import = builtins.__import__

    def no_converter(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("onnxconverter_common"):
            raise ImportError("No module named 'onnxconverter_common'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_converter)
    out = tmp_path / "out"
    assert main([str(tiny_artifact), "--fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --fp16 needs onnxconverter-common")
    assert "pip install 'tl_deploy[fp16]'" in err
    assert not out.exists()
