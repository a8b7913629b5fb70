"""ONNX FP32 export: parity with PyTorch, dynamic batch, metadata round trip, baked preprocessing, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tl_deploy.artifact import load_artifact
from tl_deploy.errors import ArtifactError, ExportError
from tl_deploy.export.__main__ import main
from tl_deploy.export.onnx import torch_to_onnx
from tl_deploy.formats.metadata import OnnxMetadata, read_onnx_metadata
from tl_deploy.formats.names import FLOAT_NCHW, UINT8_NHWC
from tl_deploy.preprocess import prepare, prepare_uint8


@pytest.fixture(scope="module")
def artifact(tiny_artifact: Path):
    return load_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def onnx_files(artifact, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    meta = artifact.onnx_metadata()
    return {
        "fp32": torch_to_onnx(artifact.model, folder / "model.onnx", metadata=meta),
        "baked": torch_to_onnx(artifact.model, folder / "model.preprocess.onnx", metadata=meta,
                               bake_preprocess=True),
    }


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(root: Path, split: str = "test") -> list[Path]:
    return sorted((root / split).rglob("*.png"))


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_onnx_logits_match_torch(artifact, onnx_files, batch: int) -> None:
    size = artifact.spec.input_size
    x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = artifact.model(torch.from_numpy(x)).numpy()
    got = _session(onnx_files["fp32"]).run(None, {"input": x})[0]
    assert got.shape == (batch, len(artifact.class_names))
    assert np.abs(got - expected).max() <= 1e-4


def test_graph_has_dynamic_batch_and_passes_full_check(onnx_files) -> None:
    model = onnx.load(str(onnx_files["fp32"]))
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert model.opset_import[0].version == 17


def test_metadata_read_back_equals_artifact(artifact, onnx_files) -> None:
    expected = artifact.onnx_metadata()
    from_onnx = read_onnx_metadata(str(onnx_files["fp32"]))
    assert from_onnx == expected
    assert from_onnx.class_names == tuple(artifact.class_names)
    assert from_onnx.spec == artifact.spec
    assert from_onnx.source_checksum == artifact.checksum and len(artifact.checksum) == 64
    # onnxruntime sees the same thing (the runtime reads it this way, without the onnx package)
    props = _session(onnx_files["fp32"]).get_modelmeta().custom_metadata_map
    assert OnnxMetadata.from_props(props) == expected
    baked = read_onnx_metadata(str(onnx_files["baked"]))
    assert baked.input_layout == UINT8_NHWC and baked.replace(input_layout=FLOAT_NCHW) == expected


def test_onnx_file_alone_classifies_like_artifact(artifact, onnx_files, tiny_data: Path) -> None:
    """Everything needed (spec + class names) comes from the file's metadata."""
    meta = read_onnx_metadata(str(onnx_files["fp32"]))
    paths = _images(tiny_data)[:6]
    batch = np.stack([prepare(p, meta.spec) for p in paths])
    logits = _session(onnx_files["fp32"]).run(None, {"input": batch})[0]
    with torch.inference_mode():
        expected = artifact.model(torch.stack([artifact.transform()(p) for p in paths])).numpy()
    assert [meta.class_names[i] for i in logits.argmax(1)] == [artifact.class_names[i] for i in expected.argmax(1)]


def test_baked_preprocess_equals_numpy_preprocessing(artifact, onnx_files, tiny_data: Path) -> None:
    paths = _images(tiny_data)[:9]
    pixels = np.stack([prepare_uint8(p, artifact.spec) for p in paths])  # (N, H, W, 3) uint8
    floats = np.stack([prepare(p, artifact.spec) for p in paths])  # (N, 3, H, W) float32
    baked = _session(onnx_files["baked"])
    assert baked.get_inputs()[0].name == "image" and baked.get_inputs()[0].type == "tensor(uint8)"
    got = baked.run(None, {"image": pixels})[0]
    expected = _session(onnx_files["fp32"]).run(None, {"input": floats})[0]
    assert np.abs(got - expected).max() <= 1e-4
    with torch.inference_mode():
        reference = artifact.model(torch.from_numpy(floats)).numpy()
    assert np.abs(got - reference).max() <= 1e-4


def test_metadata_of_foreign_file_is_refused() -> None:
    with pytest.raises(ArtifactError, match="no tl_deploy metadata"):
        OnnxMetadata.from_props({"producer": "someone"})
    with pytest.raises(ArtifactError, match="Corrupt metadata"):
        OnnxMetadata.from_props({"tl_deploy.format": "tl_deploy.onnx", "tl_deploy.class_names": "[oops"})


def test_export_refuses_bad_options(artifact, tmp_path: Path) -> None:
    meta = artifact.onnx_metadata()
    with pytest.raises(ExportError, match="Invalid exporter 'tf'"):
        torch_to_onnx(artifact.model, tmp_path / "m.onnx", metadata=meta, exporter="tf")
    with pytest.raises(ExportError, match="Invalid opset 9"):
        torch_to_onnx(artifact.model, tmp_path / "m.onnx", metadata=meta, opset=9)
    artifact.model.train()
    try:
        with pytest.raises(ExportError, match="training mode"):
            torch_to_onnx(artifact.model, tmp_path / "m.onnx", metadata=meta)
    finally:
        artifact.model.eval()
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind


# --------------------------------------------------------------------------- CLI


def test_cli_exports_onnx_and_prints_table(tiny_artifact: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export" / "tiny"
    assert main([str(tiny_artifact), "--onnx", "--bake-preprocess", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for column in ("format", "file", "size MB", "build s", "status"):
        assert column in printed
    assert "model.onnx" in printed and "model.preprocess.onnx" in printed
    manifest = json.loads((out / "export.json").read_text())
    assert [f["file"] for f in manifest["files"]] == ["model.onnx", "model.preprocess.onnx"]
    assert all(f["status"] == "ok" and len(f["sha256"]) == 64 for f in manifest["files"])
    assert manifest["source"]["checksum"] == load_artifact(tiny_artifact).checksum
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temp folders left


def run_cli(args: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["{missing}"], "Model artifact folder not found", 1),
        (["{model}", "--trt", "--trt-profile", "0:1:2"], "Invalid --trt-profile '0:1:2'", 2),
        (["{model}", "--device", "first"], "'first' is not an integer >= 0", 2),
        (["{model}", "--calib-method", "magic"], "invalid choice: 'magic'", 2),
        (["{model}", "--opset", "nine"], "'nine' is not an integer in [13, 23]", 2),
        (["{model}", "--int8"], "pass --calib-data DIR", 1),
        (["{model}", "--int8", "--calib-data", "{missing}"], "Calibration folder", 1),
    ],
)
def test_cli_errors_are_one_line(tiny_artifact: Path, tmp_path: Path, capsys, argv, message, code) -> None:
    out = tmp_path / "out"
    args = [a.format(model=tiny_artifact, missing=tmp_path / "nope") for a in argv] + ["--out", str(out)]
    assert run_cli(args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists()
