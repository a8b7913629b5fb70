"""Parity: exported backends against PyTorch, default tolerances, and broken exports that must FAIL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tl_deploy.comparison import DEFAULT_TOLERANCES, Tolerance, compare_logits, parse_overrides, tolerances
from tl_deploy.errors import TlDeployError
from tl_deploy.export import ExportOptions, export_artifact
from tl_deploy.formats.metadata import embed_metadata, read_onnx_metadata
from tl_deploy.formats.names import parity_report_paths
from tl_deploy.parity import main, run_parity
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.runtime.catalog import export_backend_name, parse_backends, resolve_backends
from tl_deploy.runtime.gpu import tensorrt_problem as find_tensorrt_problem


def _broken_copy(export_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(export_dir, out)
    return out


def _edit_onnx(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))


def _initializer(model: onnx.ModelProto, name: str) -> tuple[onnx.TensorProto, np.ndarray]:
    init = next(i for i in model.graph.initializer if i.name == name)
    return init, numpy_helper.to_array(init).copy()


# --------------------------------------------------------------------------- the real thing


def test_exported_backends_pass_with_default_tolerances(tiny_artifact: Path, export_dir: Path,
                                                        tiny_data: Path) -> None:
    report = run_parity(tiny_artifact, export_dir, data=tiny_data)
    results = {r.name: r for r in report.results}
    assert report and report.images == 24 and report.reference["device"] == "cpu"
    for name in ("onnx-fp32", "onnx-fp32-uint8", "onnx-int8", "onnx-int8-qdq"):
        assert results[name].status == "passed", results[name].line()
        assert results[name].line().startswith(f"PASSED | {name} | model.")
    fp32 = results["onnx-fp32"].metrics
    assert fp32["max_abs_logit_diff"] <= 1e-3 and fp32["agreement"] == 1.0 and fp32["accuracy_delta_pt"] == 0.0
    assert results["onnx-int8"].metrics["max_abs_logit_diff"] > fp32["max_abs_logit_diff"]  # really INT8
    assert results["onnx-int8"].tolerance == DEFAULT_TOLERANCES["int8"]
    for name in ("trt-fp32", "trt-fp16", "trt-int8"):  # listed, never dropped
        assert results[name].status == "skipped" and "--trt" in results[name].reason
        assert results[name].line().startswith(f"SKIPPED | {name} | ")


def test_cli_prints_lines_and_writes_reports(tiny_artifact: Path, export_dir: Path, tiny_data: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(tiny_artifact), "--export", str(export_dir), "--data", str(tiny_data),
                 "--backends", "onnx-fp32,onnx-int8", "trt-int8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PASSED | onnx-fp32 | model.onnx | max|dlogit|" in out and "PASSED | onnx-int8 |" in out
    assert "SKIPPED | trt-int8 |" in out and "onnx-fp32-uint8" not in out  # only the asked-for backends
    json_path, md_path = parity_report_paths(export_dir, "test")
    assert json_path.parent == export_dir.parent  # next to the export, not inside it
    report = json.loads(json_path.read_text())
    assert report["passed"] is True and report["images"] == 24 and report["split"] == "test"
    assert [b["backend"] for b in report["backends"]] == ["onnx-fp32", "onnx-int8", "trt-int8"]
    assert report["backends"][0]["tolerance"] == {"atol": 1e-3, "max_acc_drop_pt": 0.0, "min_agreement_pct": 100.0}
    assert md_path.read_text().startswith("# Parity: PASSED")


# --------------------------------------------------------------------------- broken exports must FAIL


def test_wrong_normalisation_in_metadata_fails(tiny_artifact: Path, export_dir: Path, tiny_data: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _broken_copy(export_dir, tmp_path)

    def wrong_mean_std(model: onnx.ModelProto) -> None:
        meta = read_onnx_metadata(str(broken / "model.onnx"))
        embed_metadata(model, meta.replace(spec=PreprocessSpec(input_size=32, resize=32, mean=(0.5, 0.5, 0.5),
                                                               std=(0.5, 0.5, 0.5))))

    _edit_onnx(broken / "model.onnx", wrong_mean_std)
    code = main([str(tiny_artifact), "--export", str(broken), "--data", str(tiny_data), "--backends", "onnx-fp32",
                 "onnx-int8", "--no-verify"])  # edited on purpose: compare it anyway
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED | onnx-fp32 | model.onnx |" in out and "preprocessing differs" in out
    assert "PASSED | onnx-int8 |" in out  # the untouched file still passes
    report = json.loads(parity_report_paths(broken, "test")[0].read_text())
    assert report["passed"] is False
    fp32 = report["backends"][0]
    assert fp32["status"] == "failed" and fp32["max_abs_logit_diff"] > 1e-3  # the numbers show it as well


def test_perturbed_weights_fail(tiny_artifact: Path, export_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    broken = _broken_copy(export_dir, tmp_path)

    def nudge_classifier(model: onnx.ModelProto) -> None:  # a small change: top-1 may survive, logits do not
        init, weight = _initializer(model, "classifier.weight")
        weight[0, 0] += 0.05
        init.CopyFrom(numpy_helper.from_array(weight, init.name))

    def sink_class_0(model: onnx.ModelProto) -> None:  # INT8 file (float bias): class 0 never wins
        init, bias = _initializer(model, "classifier.bias")
        bias[0] -= 5.0
        init.CopyFrom(numpy_helper.from_array(bias, init.name))

    _edit_onnx(broken / "model.onnx", nudge_classifier)
    _edit_onnx(broken / "model.int8.onnx", sink_class_0)
    report = run_parity(tiny_artifact, broken, data=tiny_data, backends=["onnx-fp32", "onnx-int8-qdq"],
                        verify=False)  # edited on purpose: the numbers must show it
    fp32, int8 = report.results
    assert not report and not fp32 and not int8
    assert "max|dlogit|" in fp32.reason and fp32.metrics["max_abs_logit_diff"] > 1e-3
    assert "agreement" in int8.reason and int8.metrics["agreement"] < 0.98
    assert int8.disagreements and {"path", "label", "torch", "backend"} <= set(int8.disagreements[0])
    # A looser tolerance, asked for explicitly, lets the small FP32 nudge through.
    loose = run_parity(tiny_artifact, broken, data=tiny_data, backends=["onnx-fp32"],
                       tolerance=tolerances(atol={"fp32": 1.0}), verify=False)
    assert loose and loose.results[0].status == "passed"


def test_nothing_comparable_exits_2_and_bad_input_is_one_line(tiny_artifact: Path, export_dir: Path,
                                                              tiny_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    if find_tensorrt_problem() is None:
        pytest.skip("TensorRT works here: trt-fp32 would run")
    assert main([str(tiny_artifact), "--export", str(export_dir), "--data", str(tiny_data),
                 "--backends", "trt-fp32"]) == 2
    assert "No backend could be compared" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--export", str(tmp_path / "nope"), "--data", str(tiny_data)]) == 1
    assert "Export folder not found" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--export", str(export_dir), "--backends", "onnx-fp64"]) == 2  # usage
    assert "Invalid backend 'onnx-fp64'" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--export", str(export_dir), "--data", str(tiny_data),
                 "--min-agreement", "int8=101"]) == 2  # a value out of range: usage
    assert "between 0 and 100" in capsys.readouterr().err


# --------------------------------------------------------------------------- pure pieces


def test_compare_logits_checks_each_tolerance() -> None:
    ref = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    labels = np.array([0, 1, 2, 1])  # torch: 3 of 4 right
    paths = [f"img{i}.png" for i in range(4)]
    tol = Tolerance(atol=1e-3, max_acc_drop=0.0, min_agreement=100.0)
    metrics, failures, disagreements = compare_logits(ref, ref + 1e-4, labels, paths, "abc", tol)
    assert failures == [] and metrics["agreement"] == 1.0 and metrics["accuracy"] == 0.75
    flipped = ref.copy()
    flipped[3] = [0.0, 2.0, 0.0]  # now right where torch was wrong: accuracy rises, agreement falls
    metrics, failures, disagreements = compare_logits(ref, flipped, labels, paths, "abc", tol)
    assert metrics["accuracy_delta_pt"] == 25.0 and metrics["agreement"] == 0.75
    assert [f.split()[0] for f in failures] == ["max|dlogit|", "agreement"]
    assert disagreements == [{"path": "img3.png", "label": "b", "torch": "a", "backend": "b"}]
    worse = ref.copy()
    worse[0] = [0.0, 0.0, 2.0]
    _, failures, _ = compare_logits(ref, worse, labels, paths, "abc", Tolerance(None, 1.0, 0.0))
    assert failures == ["accuracy drop 25.00 pt > 1"]
    nan = ref.copy()
    nan[1, 1] = np.nan  # NaN must never slip through a "<=" comparison
    assert compare_logits(ref, nan, labels, paths, "abc", tol)[1] == ["1 non-finite logits"]
    assert "shape" in compare_logits(ref, ref[:, :2], labels, paths, "abc", tol)[1][0]


def test_tolerance_overrides() -> None:
    assert parse_overrides(["1e-2"], "--atol", low=0) == {"fp32": 1e-2, "fp16": 1e-2, "int8": 1e-2, "bf16": 1e-2}
    assert parse_overrides(["int8=0.5", "fp16=0.1"], "--max-acc-drop", low=0) == {"int8": 0.5, "fp16": 0.1}
    tol = tolerances(max_acc_drop={"int8": 0.5})
    assert tol["int8"] == Tolerance(None, 0.5, 98.0) and tol["fp32"] == DEFAULT_TOLERANCES["fp32"]
    assert tol["bf16"] == Tolerance(None, 0.3, 99.5)  # OpenVINO's bf16 compute: held like FP16
    assert parse_overrides(["bf16=0.5"], "--max-acc-drop", low=0) == {"bf16": 0.5}
    with pytest.raises(TlDeployError, match="precision must be one of"):
        parse_overrides(["int4=1"], "--atol", low=0)
    with pytest.raises(TlDeployError, match="give a number"):
        parse_overrides(["int8=lots"], "--atol", low=0)
    with pytest.raises(TlDeployError, match=">= 0"):
        parse_overrides(["-1"], "--atol", low=0)


def test_backend_names_and_skip_reasons() -> None:
    files = [
        {"file": "model.onnx", "kind": "onnx", "precision": "fp32", "input_layout": "float32_nchw", "status": "ok"},
        {"file": "model.preprocess.onnx", "kind": "onnx", "precision": "fp32", "input_layout": "uint8_nhwc",
         "status": "ok"},
        {"file": "model.int8.onnx", "kind": "onnx", "precision": "int8", "target": "tensorrt", "status": "ok"},
        {"file": "model.int8.cpu.onnx", "kind": "onnx", "precision": "int8", "target": "cpu", "status": "failed"},
        {"file": "model.fp16.engine", "kind": "engine", "precision": "fp16", "target": "tensorrt", "status": "ok"},
    ]
    assert [export_backend_name(f) for f in files] == ["onnx-fp32", "onnx-fp32-uint8", "onnx-int8-qdq",
                                                       "onnx-int8", "trt-fp16"]
    names = parse_backends(["torch-cudagraph,onnx-fp32", "onnx-int8", "trt-fp16", "trt-int8", "onnx-fp32"])
    assert names == ["torch-cudagraph", "onnx-fp32", "onnx-int8", "trt-fp16", "trt-int8"]
    choices = resolve_backends(names, files, model_dir="models/m", tensorrt_problem="no TensorRT",
                               cuda_problem="no GPU")
    reasons = {c.name: c.skip_reason for c in choices}
    assert reasons["onnx-fp32"] == "" and [c.file for c in choices][1] == "model.onnx"
    assert reasons["torch-cudagraph"] == "needs CUDA: no GPU"
    assert "export status 'failed'" in reasons["onnx-int8"]
    assert reasons["trt-fp16"] == "model.fp16.engine: no TensorRT"
    assert "python -m tl_deploy.export models/m --trt --int8" in reasons["trt-int8"]
    with pytest.raises(TlDeployError, match="Invalid backend 'tensorflow'"):
        parse_backends(["tensorflow"])


# --------------------------------------------------------------------------- TensorRT


@pytest.mark.gpu
def test_tensorrt_engines_pass_with_default_tolerances(tiny_artifact: Path, tiny_data: Path,
                                                       tmp_path: Path) -> None:
    problem = find_tensorrt_problem()
    if problem is not None:
        pytest.skip(f"TensorRT/CUDA not usable here: {problem}")
    reports = []
    for options, folder in ((ExportOptions(int8=True, trt=True, fp16=True, calib_data=tiny_data, calib_samples=24),
                             "int8_fp16"), (ExportOptions(trt=True), "fp32")):
        export_artifact(tiny_artifact, tmp_path / folder, options)
        reports.append(run_parity(tiny_artifact, tmp_path / folder, data=tiny_data,
                                  backends=["trt-fp32", "trt-fp16", "trt-int8"]))
    ran = {r.name: r for report in reports for r in report.results if r.status != "skipped"}
    assert set(ran) == {"trt-fp32", "trt-fp16", "trt-int8"}
    assert all(r.status == "passed" for r in ran.values()), [r.line() for r in ran.values()]
