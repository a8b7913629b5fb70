"""OpenVINO backend: the runner lifecycle, parity with PyTorch, the INT8 file, bf16 named as such, the
auto rule, and the one-line refusals (not installed, an op it cannot convert, a CPU without bf16)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_streams_match_serial
from tl_deploy.errors import ArtifactError, BackendUnavailableError, TlDeployError
from tl_deploy.runtime import choose_openvino_file, export_choices, load
from tl_deploy.runtime.catalog import resolve_backends
from tl_deploy.runtime.cpu import auto_choice

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tl_deploy[openvino]')")

from tl_deploy.runtime.openvino_backend import (  # noqa: E402  (after the skip: it needs openvino to run)
    OpenVinoRunner,
    bf16_problem,
    load_openvino,
    openvino_problem,
)


@pytest.fixture(scope="module")
def test_images(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def torch_clf(tiny_artifact: Path):
    return load(tiny_artifact, device="cpu")


def test_runner_lifecycle_settings_then_compile_then_release(export_dir: Path) -> None:
    runner = OpenVinoRunner(export_dir / "model.onnx", threads=1)
    assert not runner.is_active and runner.compiled is None  # __init__ compiles nothing
    assert runner.compile_config() == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                       "INFERENCE_NUM_THREADS": "1"}
    with runner:
        assert runner.is_active and runner.compute == "f32" and runner.device == "cpu"
        spec = runner.input_spec()
        assert spec is not None and spec.name == "input" and spec.shape[1:] == (3, 32, 32)
        out = runner.infer(np.zeros((2, 3, 32, 32), np.float32))
        assert out.shape == (2, 3) and out.dtype == np.float32
        assert (runner.last_inference_time() or -1.0) >= 0.0
        with pytest.raises(TlDeployError, match="dtype float64"):
            runner.infer(np.zeros((1, 3, 32, 32), np.float64))
    assert not runner.is_active and runner.compiled is None
    with pytest.raises(BackendUnavailableError, match="Invalid threads=0"):
        OpenVinoRunner(export_dir / "model.onnx", threads=0)


def test_streams_compile_that_many_requests_sharing_the_threads(export_dir: Path, test_images: list[Path]) -> None:
    runner = OpenVinoRunner(export_dir / "model.onnx", threads=2, streams=2)
    assert runner.compile_config() == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT",
                                       "NUM_STREAMS": "2", "INFERENCE_NUM_THREADS": "2"}
    with pytest.raises(BackendUnavailableError, match="Invalid streams=0"):
        OpenVinoRunner(export_dir / "model.onnx", streams=0)
    clf = load(export_dir, backend="openvino", precision="fp32", threads=2, streams=2)
    with clf:
        assert clf.streams == 2  # read back from the compiled model
        assert_streams_match_serial(clf, test_images)
    with load(export_dir, backend="openvino", precision="fp32", threads=2) as one:
        assert one.streams == 1


def test_one_image_runs_a_graph_compiled_for_batch_one(export_dir: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with OpenVinoRunner(export_dir / "model.onnx", threads=1) as runner:
        batched = runner.infer(x)  # the dynamic graph
        assert runner._single is None  # compiled only when a one-image call comes
        singles = np.concatenate([runner.infer(x[i:i + 1]) for i in range(3)])
        assert runner._single is not None and runner._single[0] is not runner.compiled
        np.testing.assert_allclose(singles, batched, rtol=0, atol=1e-4)  # the same strict-f32 model
    assert runner._single is None  # released with the rest


def test_metadata_comes_from_the_onnx_file(export_dir: Path) -> None:
    with OpenVinoRunner(export_dir / "model.onnx") as runner:
        props = runner.custom_metadata()  # ONNX metadata_props, through OpenVINO's rt_info
        assert props["tl_deploy.format"] == "tl_deploy.onnx"
        assert json.loads(props["tl_deploy.class_names"]) == ["circle", "square", "bar"]
        inputs, outputs = runner.io_signature()
        assert inputs == [("input", "tensor(float)", [None, 3, 32, 32])] and outputs[0][1] == "tensor(float)"


def test_fp32_matches_torch(export_dir: Path, torch_clf, test_images: list[Path]) -> None:
    clf = load(export_dir, backend="openvino", precision="fp32", threads=2)
    assert (clf.backend_name, clf.precision, clf.source.name) == ("openvino", "fp32", "model.onnx")
    x = torch_clf.preprocess(test_images)
    assert np.abs(clf.infer(x) - torch_clf.infer(x)).max() <= 1e-4  # strict f32: not bf16
    assert clf.predict(test_images, top_k=2).labels == torch_clf.predict(test_images, top_k=2).labels
    clf.close()


def test_int8_runs_the_qdq_file(export_dir: Path, torch_clf, test_images: list[Path]) -> None:
    clf = load(export_dir, backend="openvino", threads=2)  # its fastest: the QDQ file, not the onnxruntime-tuned one
    assert (clf.precision, clf.source.name) == ("int8", "model.int8.onnx")
    same = [a == b for a, b in zip(clf.predict(test_images).labels, torch_clf.predict(test_images).labels)]
    assert np.mean(same) >= 0.8
    clf.close()


def test_bf16_is_named_bf16(export_dir: Path, torch_clf, test_images: list[Path]) -> None:
    clf = load_openvino(export_dir / "model.onnx", precision="bf16", force_bf16=True)  # runs on any CPU
    assert clf.runner.compute in ("bf16", "f32")  # what OpenVINO reports it computes in
    assert clf.precision == ("bf16" if clf.runner.compute == "bf16" else "fp32")  # never bf16 called fp32
    same = [a == b for a, b in zip(clf.predict(test_images).labels, torch_clf.predict(test_images).labels)]
    assert np.mean(same) >= 0.8
    clf.close()
    with pytest.raises(BackendUnavailableError, match="bf16 computes an FP32 file, but model.int8.onnx is int8"):
        load_openvino(export_dir / "model.int8.onnx", precision="bf16", force_bf16=True)


def test_bf16_is_refused_on_a_cpu_without_it(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bf16_problem(["FP32", "BF16", "INT8"]) is None
    assert "no native bf16" in str(bf16_problem(["FP32", "INT8"]))
    monkeypatch.setattr("tl_deploy.runtime.openvino_backend.cpu_capabilities", lambda core: ["FP32", "INT8"])
    with pytest.raises(BackendUnavailableError, match="this CPU has no native bf16.*run openvino-fp32") as info:
        load(export_dir / "model.onnx", precision="bf16")
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    other = load(export_dir / "model.onnx", backend="onnxruntime", device="cpu")  # other backends keep working
    assert other.predict(np.zeros((32, 32, 3), np.uint8)).labels
    other.close()


def test_missing_openvino_is_one_line_with_the_install(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_openvino(name: str, *args: object, **kwargs: object) -> object:
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(BackendUnavailableError,
                       match=r"OpenVINO is not installed: pip install 'tl_deploy\[openvino\]'"):
        load(export_dir, backend="openvino")
    assert "pip install 'tl_deploy[openvino]'" in str(openvino_problem())
    clf = load(export_dir / "model.onnx", device="cpu")  # onnxruntime still runs
    assert clf.backend_name == "onnxruntime"
    clf.close()


def test_an_op_openvino_cannot_convert_is_one_line(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FancyOp", ["x"], ["y"], domain="my.domain")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("my.domain", 1)]), path)
    with pytest.raises(BackendUnavailableError, match=r"cannot convert operation\(s\) my.domain.FancyOp of "
                                                      r"custom.onnx: run it with backend='onnxruntime'") as info:
        OpenVinoRunner(path).activate()
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="OpenVINO cannot read .*junk.onnx: Unable to read the model"):
        OpenVinoRunner(tmp_path / "junk.onnx").activate()


def test_catalog_names_and_files(export_dir: Path) -> None:
    files = json.loads((export_dir / "export.json").read_text())["files"]
    choices = resolve_backends(["openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-fp16"], files,
                               model_dir="m", tensorrt_problem=None, cuda_problem=None)
    assert [(c.name, c.precision, c.file) for c in choices] == [
        ("openvino-fp32", "fp32", "model.onnx"), ("openvino-bf16", "bf16", "model.onnx"),
        ("openvino-int8", "int8", "model.int8.onnx"), ("openvino-fp16", "fp16", None)]
    assert "--fp16" in choices[3].skip_reason
    assert choose_openvino_file(files, precision="bf16")["file"] == "model.onnx"
    with pytest.raises(ArtifactError, match="No ONNX file for OpenVINO fp16"):
        choose_openvino_file(files, precision="fp16")
    assert export_choices(export_dir, tensorrt_ok=False, openvino_ok=True) == [
        ("openvino", "int8"), ("openvino", "fp32"), ("onnxruntime", "int8"), ("onnxruntime", "fp32")]


def test_auto_rule(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_choice(installed=True, machine="x86_64", flags={"avx512_vnni"})[0] == "int8"
    assert auto_choice(installed=True, machine="AMD64", flags={"avx_vnni"})[0] == "int8"
    assert auto_choice(installed=True, machine="x86_64", flags={"avx512_vnni", "avx512_bf16"})[0] == "int8"
    assert auto_choice(installed=True, machine="x86_64", flags={"avx512_vnni", "amx_bf16"})[0] == "bf16"
    precision, why = auto_choice(installed=True, machine="x86_64", flags={"avx2"})
    assert precision is None and "no VNNI" in why
    assert "aarch64" in auto_choice(installed=True, machine="aarch64", flags={"amx_bf16"})[1]
    assert "not installed" in auto_choice(installed=False, machine="x86_64", flags={"avx512_vnni"})[1]
    monkeypatch.setattr("tl_deploy.runtime.openvino_auto_choice", lambda: ("int8", "VNNI"))
    clf = load(export_dir, device="cpu")
    assert (clf.backend_name, clf.precision, clf.source.name) == ("openvino", "int8", "model.int8.onnx")
    clf.close()
    fp32 = load(export_dir, precision="fp32", device="cpu")  # the rule is auto's: a named fp32 stays onnxruntime
    assert fp32.backend_name == "onnxruntime"
    fp32.close()


def test_auto_rule_on_an_amx_cpu_runs_the_fp32_file_in_bf16(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tl_deploy.runtime.openvino_auto_choice", lambda: ("bf16", "AMX"))
    monkeypatch.setattr("tl_deploy.runtime.openvino_backend.bf16_problem", lambda capabilities: None)
    clf = load(export_dir, device="cpu")
    assert (clf.backend_name, clf.source.name) == ("openvino", "model.onnx")
    assert clf.runner.compile_config()["INFERENCE_PRECISION_HINT"] == "bf16"  # what auto asked for
    # What OpenVINO computes in depends on this CPU; the name follows it, never bf16 called fp32.
    assert clf.precision == ("bf16" if clf.runner.compute == "bf16" else "fp32")
    clf.close()


def test_refusals_of_options_openvino_does_not_have(export_dir: Path) -> None:
    with pytest.raises(TlDeployError, match="providers= are onnxruntime options"):
        load(export_dir / "model.onnx", backend="openvino", providers=["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="OpenVINO runs on the CPU here, not device='cuda'"):
        load(export_dir / "model.onnx", backend="openvino", device="cuda")
    with pytest.raises(TlDeployError, match="computed by OpenVINO only, not backend='onnxruntime'"):
        load(export_dir / "model.onnx", backend="onnxruntime", precision="bf16")


def test_the_app_lists_openvino_when_it_is_here(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tl_deploy import model_card

    monkeypatch.setattr("tl_deploy.runtime.cpu.native_bf16", lambda: False)
    engines = model_card.available_engines(export_dir, tensorrt_ok=False, torch_ok=False, openvino_ok=True)
    assert [e.label for e in engines] == ["fastest available", "OpenVINO INT8", "OpenVINO FP32", "ONNX Runtime INT8",
                                          "ONNX Runtime FP32"]
    chosen = next(e for e in engines if e.label == "OpenVINO FP32")
    clf = load(chosen.path, backend=chosen.backend, precision=chosen.precision)  # what the page loads
    assert (clf.backend_name, clf.precision) == ("openvino", "fp32")
    clf.close()
    monkeypatch.setattr("tl_deploy.runtime.cpu.native_bf16", lambda: True)  # a CPU with native bf16
    engines = model_card.available_engines(export_dir, tensorrt_ok=False, torch_ok=False, openvino_ok=True)
    assert [e.label for e in engines][1:3] == ["OpenVINO INT8", "OpenVINO BF16"]
