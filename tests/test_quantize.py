"""INT8 ONNX: calibration image feeding, real int8 weights, symmetric QDQ for TensorRT, top-1 kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tl_deploy.artifact import load_artifact
from tl_deploy.errors import DataError, ExportError
from tl_deploy.export import ExportOptions, export_artifact
from tl_deploy.export.onnx import torch_to_onnx
from tl_deploy.export.quantize import (
    QuantizationConfig,
    _FeedReader,
    calibration_batches,
    int8_weight_fraction,
    onnx_to_int8_onnx,
    select_calibration_images,
    signed_input_convs,
)
from tl_deploy.formats.metadata import read_onnx_metadata
from tl_deploy.preprocess import PreprocessSpec, prepare, prepare_uint8

CLASSES = ["bar", "circle", "square"]


@pytest.fixture(scope="module")
def fp32_onnx(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    artifact = load_artifact(tiny_artifact)
    out = tmp_path_factory.mktemp("q") / "model.onnx"
    return torch_to_onnx(artifact.model, out, metadata=artifact.onnx_metadata())


@pytest.fixture(scope="module")
def calib(tiny_data: Path) -> list[np.ndarray]:
    paths = select_calibration_images(tiny_data, 48)
    return list(calibration_batches(paths, PreprocessSpec(input_size=32, resize=32), batch_size=16))


@pytest.fixture(scope="module")
def int8_files(fp32_onnx: Path, calib: list[np.ndarray], tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("int8")
    cache = folder / "ranges.json"
    return {
        target: onnx_to_int8_onnx(fp32_onnx, folder / f"{target}.onnx", calib,
                                  config=QuantizationConfig(target=target), calibration_source="tiny",
                                  calibration_cache=cache).path
        for target in ("tensorrt", "cpu")
    }


def _run(path: Path, x: np.ndarray, exact: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# --------------------------------------------------------------------------- calibration feeding


def test_select_calibration_images_balances_classes_from_train(tiny_data: Path) -> None:
    picked = select_calibration_images(tiny_data, 9, seed=3)
    assert len(picked) == 9
    assert all(p.parent.parent == tiny_data / "train" for p in picked)  # train split only
    assert sorted(p.parent.name for p in picked) == sorted(CLASSES * 3)  # interleaved classes
    assert picked == select_calibration_images(tiny_data, 9, seed=3)  # seeded
    assert picked != select_calibration_images(tiny_data, 9, seed=4)


def test_select_calibration_images_takes_all_when_fewer(tiny_data: Path) -> None:
    assert len(select_calibration_images(tiny_data / "val", 10_000)) == 3 * 8


def test_select_calibration_images_errors(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(DataError, match="Calibration folder not found"):
        select_calibration_images(tmp_path / "missing", 4)
    with pytest.raises(DataError, match="No images"):
        select_calibration_images(tmp_path, 4)
    with pytest.raises(DataError, match="Invalid --calib-samples 0"):
        select_calibration_images(tiny_data, 0)


def test_calibration_batches_preprocess_like_runtime(tiny_data: Path) -> None:
    spec = PreprocessSpec(input_size=32, resize=32)
    paths = select_calibration_images(tiny_data, 7)
    batches = list(calibration_batches(paths, spec, batch_size=3))
    assert [b.shape for b in batches] == [(3, 3, 32, 32)] * 2 + [(1, 3, 32, 32)]
    assert all(b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches)[4], prepare(paths[4], spec))
    pixels = list(calibration_batches(paths, spec, batch_size=4, input_layout="uint8_nhwc"))
    assert pixels[0].dtype == np.uint8 and pixels[0].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(pixels[1][0], prepare_uint8(paths[4], spec))
    with pytest.raises(DataError, match="batch size 0"):
        next(calibration_batches(paths, spec, batch_size=0))


def test_feed_reader_counts_images_and_ends() -> None:
    reader = _FeedReader("input", [np.zeros((2, 3, 4, 4), np.float32), np.zeros((1, 3, 4, 4), np.float32)])
    first = reader.get_next()
    assert first is not None and list(first) == ["input"] and first["input"].shape[0] == 2
    assert reader.get_next() is not None and reader.get_next() is None and reader.get_next() is None
    assert reader.count == 3


def test_signed_input_convs_finds_convs_fed_by_non_relu() -> None:
    def conv(name: str, src: str, group: int = 1) -> onnx.NodeProto:
        return helper.make_node("Conv", [src, f"{name}.w"], [f"{name}.y"], name=name, group=group)

    nodes = [
        conv("stem", "x"),  # graph input: signed
        helper.make_node("Clip", ["stem.y"], ["a"], name="relu6"),
        conv("after_relu", "a"),  # unsigned input
        conv("depthwise", "after_relu.y", group=8),  # depthwise: other kernel, never listed
        helper.make_node("Add", ["depthwise.y", "stem.y"], ["s"], name="residual"),
        conv("after_add", "s"),  # signed input
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("after_add.y", onnx.TensorProto.FLOAT, None)])
    assert [n.name for n in signed_input_convs(helper.make_model(graph))] == ["stem", "after_add"]


# --------------------------------------------------------------------------- the INT8 files


def test_int8_file_holds_int8_weights_and_is_small(fp32_onnx: Path, int8_files: dict[str, Path]) -> None:
    for path in int8_files.values():
        assert int8_weight_fraction(path) > 0.6
        assert path.stat().st_size < 0.6 * fp32_onnx.stat().st_size  # tiny model: biases/scales weigh more
    ops = {n.op_type for n in onnx.load(str(int8_files["tensorrt"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_tensorrt_file_is_symmetric_int8_per_channel(int8_files: dict[str, Path]) -> None:
    model = onnx.load(str(int8_files["tensorrt"]))
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points
    for zp in zero_points:  # TensorRT takes int8 with zero point 0 only
        assert zp.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zp).any()
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and numpy_helper.to_array(inits[n.input[1]]).size > 1]
    assert per_channel  # weight scales per output channel


def test_cpu_file_uses_uint8_weights_where_input_is_signed(int8_files: dict[str, Path]) -> None:
    model = onnx.load(str(int8_files["cpu"]))
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    weight_dtypes = {dtypes[n.input[0]] for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in dtypes and n.input[0].endswith("_quantized")}
    assert {onnx.TensorProto.UINT8, onnx.TensorProto.INT8} <= weight_dtypes


def test_int8_metadata_records_choices(int8_files: dict[str, Path], fp32_onnx: Path) -> None:
    source = read_onnx_metadata(str(fp32_onnx))
    for target, path in int8_files.items():
        meta = read_onnx_metadata(str(path))
        assert meta.precision == "int8" and meta.class_names == source.class_names and meta.spec == source.spec
        q = meta.quantization
        assert q["target"] == target and q["format"] == "QDQ" and q["calibration_method"] == "minmax"
        assert q["per_channel"] is True and q["calibration_images"] == 48 and q["nodes_kept_float"] == []


def test_int8_keeps_top1_on_most_inputs(fp32_onnx: Path, int8_files: dict[str, Path], tiny_data: Path) -> None:
    spec = PreprocessSpec(input_size=32, resize=32)
    x = np.stack([prepare(p, spec) for p in sorted((tiny_data / "test").rglob("*.png"))])
    reference = _run(fp32_onnx, x).argmax(1)
    assert (_run(int8_files["cpu"], x).argmax(1) == reference).mean() >= 0.8
    assert (_run(int8_files["tensorrt"], x, exact=True).argmax(1) == reference).mean() >= 0.8


def test_quantize_refuses_bad_input(fp32_onnx: Path, tmp_path: Path, tiny_artifact: Path, calib) -> None:
    with pytest.raises(ExportError, match="Invalid calibration method 'best'"):
        QuantizationConfig(method="best")
    with pytest.raises(ExportError, match="Invalid INT8 target 'dsp'"):
        QuantizationConfig(target="dsp")
    with pytest.raises(ExportError, match="ONNX file not found"):
        onnx_to_int8_onnx(tmp_path / "nope.onnx", tmp_path / "q.onnx", calib, config=QuantizationConfig())
    with pytest.raises(ExportError, match="not in the graph"):
        onnx_to_int8_onnx(fp32_onnx, tmp_path / "q.onnx", calib,
                          config=QuantizationConfig(nodes_to_exclude=("nope",)))
    artifact = load_artifact(tiny_artifact)
    baked = torch_to_onnx(artifact.model, tmp_path / "baked.onnx", metadata=artifact.onnx_metadata(),
                          bake_preprocess=True)
    with pytest.raises(ExportError, match="quantize the float32"):
        onnx_to_int8_onnx(baked, tmp_path / "q.onnx", calib, config=QuantizationConfig())
    assert not (tmp_path / "q.onnx").exists()


def test_export_artifact_int8_end_to_end(tiny_artifact: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    rows = export_artifact(tiny_artifact, out, ExportOptions(int8=True, calib_data=tiny_data, calib_samples=30))
    assert [r.file for r in rows] == ["model.onnx", "model.int8.onnx", "model.int8.cpu.onnx"]
    assert all(r.status == "ok" for r in rows)
    assert "top-1 agrees" in rows[1].check and "held-out" in rows[2].check
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["options"]["calib_images"] == 30
    assert "on 42 held-out" in rows[2].check  # the other 72 - 30 training images
    assert read_onnx_metadata(str(out / "model.int8.cpu.onnx")).quantization["target"] == "cpu"
