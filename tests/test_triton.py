"""Triton model repository from an export folder: layout, Triton's own config schema, dims and dtypes
from the graph, labels, preprocessing parameters, refusals, atomicity, same logits, CLI."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.conftest import TINY_CLASSES, TINY_SIZE
from tl_deploy.errors import ArtifactError, OutputError
from tl_deploy.export import triton
from tl_deploy.export.__main__ import main
from tl_deploy.export.triton import LABELS_FILE, REPOSITORY_MARKER, write_triton_repository
from tl_deploy.fileio import read_json, sha256_file
from tl_deploy.formats.names import EXPORT_MANIFEST
from tl_deploy.preprocess import PreprocessSpec


@pytest.fixture(scope="module")
def model_config_pb2() -> ModuleType:
    """tritonclient's ``model_config_pb2`` (Triton's ModelConfig schema), loaded from its file: the
    ``tritonclient.grpc`` package itself wants grpcio, which the schema does not need."""
    tritonclient = pytest.importorskip("tritonclient", reason="pip install 'tl_deploy[dev]' (tritonclient)")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(path: Path, pb2: ModuleType) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb2.ModelConfig())


@pytest.fixture(scope="module")
def repository(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_triton_repository(export_dir, out)
    return out


def test_layout_one_model_per_exported_file(repository: Path) -> None:
    models = sorted(p.name for p in repository.iterdir() if p.is_dir())
    assert models == ["tiny-fp32", "tiny-fp32-uint8", "tiny-int8", "tiny-int8-cpu"]
    for name in models:
        assert sorted(p.name for p in (repository / name).iterdir()) == ["1", "config.pbtxt", LABELS_FILE]
        assert [p.name for p in (repository / name / "1").iterdir()] == ["model.onnx"]
    assert read_json(repository / REPOSITORY_MARKER)["models"]["tiny-int8"] == "model.int8.onnx"


def test_every_config_parses_with_tritons_schema(repository: Path, model_config_pb2: ModuleType) -> None:
    pb2 = model_config_pb2
    for folder in (p for p in repository.iterdir() if p.is_dir()):
        config = parse_config(folder / "config.pbtxt", pb2)
        assert config.name == folder.name
        assert config.backend == "onnxruntime"
        assert config.max_batch_size == 32  # the export's default TensorRT profile max, batch dim dynamic
        assert config.HasField("dynamic_batching")
        (output,) = config.output
        assert (output.name, output.data_type, list(output.dims)) == ("logits", pb2.TYPE_FP32, [len(TINY_CLASSES)])
        assert output.label_filename == LABELS_FILE
        (inp,) = config.input
        if folder.name.endswith("uint8"):
            assert (inp.name, inp.data_type, list(inp.dims)) == ("image", pb2.TYPE_UINT8, [TINY_SIZE, TINY_SIZE, 3])
        else:
            assert (inp.name, inp.data_type, list(inp.dims)) == ("input", pb2.TYPE_FP32, [3, TINY_SIZE, TINY_SIZE])
        kind = pb2.ModelInstanceGroup.KIND_CPU if folder.name.endswith("cpu") else pb2.ModelInstanceGroup.KIND_AUTO
        assert [g.kind for g in config.instance_group] == [kind]


def test_dims_and_names_come_from_the_graph(repository: Path, model_config_pb2: ModuleType) -> None:
    config = parse_config(repository / "tiny-fp32-uint8" / "config.pbtxt", model_config_pb2)
    graph = onnx.load(str(repository / "tiny-fp32-uint8" / "1" / "model.onnx")).graph
    (value,) = [v for v in graph.input if v.name not in {t.name for t in graph.initializer}]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
    assert config.input[0].name == value.name
    assert list(config.input[0].dims) == shape[1:]
    assert config.output[0].name == graph.output[0].name


def test_fixed_batch_graph_gets_no_batching() -> None:
    spec = triton.TensorSpec("input", "TYPE_FP32", (3, 8, 8))
    assert triton._with_batch([spec], 4)[0].dims == (4, 3, 8, 8)


def test_labels_file_lists_the_classes_in_logit_order(repository: Path) -> None:
    for folder in (p for p in repository.iterdir() if p.is_dir()):
        assert (folder / LABELS_FILE).read_text().splitlines() == TINY_CLASSES


def test_preprocessing_spec_in_parameters(repository: Path, export_dir: Path, model_config_pb2: ModuleType) -> None:
    spec = PreprocessSpec.from_dict(read_json(export_dir / EXPORT_MANIFEST)["metadata"]["preprocess"])
    float_cfg = parse_config(repository / "tiny-fp32" / "config.pbtxt", model_config_pb2)
    params = {k: v.string_value for k, v in float_cfg.parameters.items()}
    assert json.loads(params["tl_deploy.mean"]) == list(spec.mean)
    assert json.loads(params["tl_deploy.std"]) == list(spec.std)
    assert int(params["tl_deploy.input_size"]) == spec.input_size == TINY_SIZE
    assert (params["tl_deploy.layout"], params["tl_deploy.input_layout"]) == ("NCHW", "float32_nchw")
    assert PreprocessSpec.from_dict(json.loads(params["tl_deploy.preprocess"])) == spec
    baked = parse_config(repository / "tiny-fp32-uint8" / "config.pbtxt", model_config_pb2)
    assert baked.parameters["tl_deploy.layout"].string_value == "NHWC"
    assert baked.parameters["tl_deploy.input_layout"].string_value == "uint8_nhwc"
    int8 = parse_config(repository / "tiny-int8" / "config.pbtxt", model_config_pb2)
    assert int8.parameters["tl_deploy.precision"].string_value == "int8"


def test_repository_onnx_gives_the_exports_logits(repository: Path, export_dir: Path) -> None:
    batch = np.random.default_rng(0).standard_normal((4, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    for name, source in (("tiny-fp32", "model.onnx"), ("tiny-int8-cpu", "model.int8.cpu.onnx")):
        served = repository / name / "1" / "model.onnx"
        assert sha256_file(served) == sha256_file(export_dir / source)
        logits = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0]
                  for p in (served, export_dir / source)]
        np.testing.assert_array_equal(logits[0], logits[1])


def test_engine_served_as_plan_with_its_profile_max(export_dir: Path, tmp_path: Path,
                                                    model_config_pb2: ModuleType) -> None:
    """An export with a TensorRT engine (faked here: no GPU) gives a tensorrt model with model.plan."""
    folder = tmp_path / "tiny"
    shutil.copytree(export_dir, folder)
    engine = folder / "model.fp32.engine"
    engine.write_bytes(b"serialized engine")
    (folder / "model.fp32.engine.json").write_text(json.dumps({"profile": {"min": 1, "opt": 4, "max": 16}}))
    manifest = read_json(folder / EXPORT_MANIFEST)
    manifest["files"].append({"file": engine.name, "kind": "engine", "precision": "fp32", "status": "ok",
                              "input_layout": "float32_nchw", "source": "model.onnx",
                              "sha256": sha256_file(engine)})
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "repo"
    write_triton_repository(folder, out)
    config = parse_config(out / "tiny-trt-fp32" / "config.pbtxt", model_config_pb2)
    assert (config.backend, config.max_batch_size) == ("tensorrt", 16)
    assert list(config.input[0].dims) == [3, TINY_SIZE, TINY_SIZE]
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert (out / "tiny-trt-fp32" / "1" / "model.plan").read_bytes() == b"serialized engine"


def test_refuses_a_foreign_folder_and_ours_without_force(export_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no Triton repository"):
        write_triton_repository(export_dir, foreign, force=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    ours = tmp_path / "ours"
    write_triton_repository(export_dir, ours)
    (ours / "tiny-fp32" / "stale").write_text("x")
    with pytest.raises(OutputError, match="pass --force"):
        write_triton_repository(export_dir, ours)
    write_triton_repository(export_dir, ours, force=True)
    assert not (ours / "tiny-fp32" / "stale").exists()
    with pytest.raises(OutputError, match="overlaps the export folder"):
        write_triton_repository(export_dir, export_dir / "triton")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="Cannot write to"):  # refused before any file is read
        write_triton_repository(export_dir, tmp_path / "a-file" / "repo")


def test_nothing_half_written_on_failure(export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_copy(source: Path, dest: Path) -> None:
        calls.append(source)
        if len(calls) == 2:
            raise OSError("disk full")
        shutil.copy2(source, dest)

    monkeypatch.setattr(triton, "_copy", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        write_triton_repository(export_dir, tmp_path / "repo")
    assert list(tmp_path.iterdir()) == []  # neither the repository nor its temporary folder


def test_modified_export_file_is_refused(export_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    shutil.copytree(export_dir, folder)
    with open(folder / "model.int8.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="model.int8.onnx was modified"):
        write_triton_repository(folder, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_cli_on_an_export_folder(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(export_dir), "--triton", str(tmp_path / "repo")]) == 0
    assert "wrote Triton model repository" in capsys.readouterr().out
    assert (tmp_path / "repo" / "tiny-fp32" / "config.pbtxt").is_file()
    assert main([str(export_dir), "--triton", str(tmp_path / "repo")]) == 1  # exists: --force needed
    assert "pass --force" in capsys.readouterr().err
    assert main([str(export_dir), "--triton", str(tmp_path / "repo"), "--force"]) == 0
    assert main([str(export_dir), "--triton", str(tmp_path / "other"), "--int8"]) == 2
    assert "--int8 does nothing when MODEL_DIR is an export folder" in capsys.readouterr().err
    assert main([str(export_dir), "--force"]) == 2
    assert "--force does nothing without --triton" in capsys.readouterr().err


def test_cli_exports_then_reuses_a_current_export(tiny_artifact: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export" / "tiny"
    args = [str(tiny_artifact), "--out", str(out), "--bake-preprocess", "--triton", str(tmp_path / "repo")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reused" not in printed and "tiny-fp32-uint8" in printed
    created = read_json(out / EXPORT_MANIFEST)["created"]
    assert main([*args, "--force"]) == 0
    assert "is current" in capsys.readouterr().out
    assert read_json(out / EXPORT_MANIFEST)["created"] == created  # not exported again
    # another opset than the one recorded makes the folder stale: exported again
    assert main([str(tiny_artifact), "--out", str(out), "--opset", "18", "--triton", str(tmp_path / "repo2")]) == 0
    assert "is current" not in capsys.readouterr().out


class _FakeTritonHttp(ModuleType):
    """A stand-in for ``tritonclient.http`` answering from a repository folder with onnxruntime, in
    Triton's formats: the config as JSON, the classification extension's b"score:index:label"."""

    def __init__(self, repository: Path, pb2: ModuleType) -> None:
        super().__init__("tritonclient.http")
        from google.protobuf import json_format

        dtypes = {"FP32": np.float32, "UINT8": np.uint8}

        class InferInput:
            def __init__(self, name: str, shape: list[int], datatype: str) -> None:
                self.name, self.shape, self.datatype = name, shape, datatype

            def set_data_from_numpy(self, data: np.ndarray) -> None:
                assert list(data.shape) == self.shape and data.dtype == dtypes[self.datatype]
                self.data = data

        class InferRequestedOutput:
            def __init__(self, name: str, class_count: int = 0) -> None:
                self.name, self.class_count = name, class_count

        class InferenceServerClient:
            def __init__(self, url: str) -> None:
                self.url = url

            def get_model_config(self, model: str) -> dict[str, Any]:
                config = parse_config(repository / model / "config.pbtxt", pb2)
                return json_format.MessageToDict(config, preserving_proto_field_name=True)

            def infer(self, model: str, inputs: list[InferInput], outputs: list[InferRequestedOutput]) -> Any:
                config = parse_config(repository / model / "config.pbtxt", pb2)
                (inp,), (out,) = inputs, outputs
                assert inp.name == config.input[0].name and len(inp.shape) == len(config.input[0].dims) + 1
                assert pb2.DataType.Name(config.input[0].data_type) == f"TYPE_{inp.datatype}"
                session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
                (logits,) = session.run([out.name], {inp.name: inp.data})
                labels = (repository / model / config.output[0].label_filename).read_text().splitlines()
                rows = [[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in np.argsort(-row)[:out.class_count]]
                        for row in logits]
                return type("InferResult", (), {"as_numpy": lambda self, name: np.array(rows, dtype=object)})()

        self.InferInput, self.InferRequestedOutput = InferInput, InferRequestedOutput
        self.InferenceServerClient = InferenceServerClient


def _client_example() -> str:
    text = (Path(__file__).parent.parent / "docs" / "triton.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("variant", ["fp32", "fp32-uint8"])
def test_docs_client_example_reads_top_k_labels(variant: str, repository: Path, export_dir: Path, tiny_data: Path,
                                                model_config_pb2: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.preprocess import prepare

    images = sorted((tiny_data / "test").rglob("*.png"))[:3]
    assert images
    code = _client_example()
    constants = next(line for line in code.splitlines() if line.startswith("URL, MODEL, IMAGES, TOP_K ="))
    code = code.replace(constants, f"URL, MODEL, IMAGES, TOP_K = 'fake:8000', 'tiny-{variant}', "
                                   f"{[str(p) for p in images]!r}, 2")
    if variant == "fp32-uint8":  # the substitution the docs give for the baked model
        code = code.replace("prepare(", "prepare_uint8(").replace('"FP32"', '"UINT8"')
        code = code.replace("import PreprocessSpec, prepare", "import PreprocessSpec, prepare_uint8")
    monkeypatch.setitem(sys.modules, "tritonclient.http",
                        _FakeTritonHttp(repository, model_config_pb2))
    exec(compile(code, "docs/triton.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    spec = PreprocessSpec.from_dict(read_json(export_dir / EXPORT_MANIFEST)["metadata"]["preprocess"])
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.stack([prepare(p, spec) for p in images])})
    assert len(printed) == len(images)
    for line, path, row in zip(printed, images, logits):
        assert line.startswith(f"{path} ")
        top = ast.literal_eval(line[len(f"{path} "):])  # [(label, score), ...], best first
        assert [label for label, _ in top] == [TINY_CLASSES[i] for i in np.argsort(-row)[:2]]
        np.testing.assert_allclose([score for _, score in top], np.sort(row)[::-1][:2], atol=1e-3)


def test_readme_client_example_runs(repository: Path, tiny_data: Path, model_config_pb2: ModuleType,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = next(block.split("```", 1)[0] for block in readme.split("```python\n")[1:] if "tritonclient" in block)
    image = sorted((tiny_data / "test").rglob("*.png"))[0]
    code = code.replace('"animal-shape-efficientnet_lite0-lp-ft-fp32"', "'tiny-fp32'")
    code = code.replace('["cat.png"]', repr([str(image)])).replace("class_count=3", "class_count=2")
    monkeypatch.setitem(sys.modules, "tritonclient.http", _FakeTritonHttp(repository, model_config_pb2))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    entries = re.findall(r"b'(-?[\d.]+):(\d+):(\w+)'", printed)  # the (1, 2) array of b"logit:index:label"
    assert len(entries) == 2 and float(entries[0][0]) >= float(entries[1][0])
    assert all(TINY_CLASSES[int(index)] == label for _, index, label in entries)
