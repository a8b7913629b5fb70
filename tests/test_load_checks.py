"""Loading checks the model, not only the files: manifests that list too little, non-finite weights,
ONNX graphs whose inputs, outputs or class list disagree with their metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, TINY_SIZE
from tl_deploy.artifact import load_artifact, save_artifact
from tl_deploy.errors import ArtifactError
from tl_deploy.fileio import sha256_file


def _one_error_line(stderr: str, message: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr


def _rewrite_weights(model: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    edit(state)
    save_file(state, str(model / "model.safetensors"))


def _reseal(model: Path) -> None:
    """Record the current checksums in manifest.json, as a careful tamperer would."""
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"] = {n: sha256_file(model / n) for n in manifest["files"]}
    (model / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- item 4: manifests, weights


def test_empty_manifest_next_to_modified_weights_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_artifact, model)

    def tamper_head(state: dict[str, torch.Tensor]) -> None:
        state["classifier.bias"] = state["classifier.bias"] + torch.tensor([10.0, 0.0, 0.0])

    _rewrite_weights(model, tamper_head)
    (model / "manifest.json").write_text(json.dumps({"format": "tl_deploy.model", "files": {}}))
    with pytest.raises(ArtifactError, match=r"lists no checksum for model.safetensors, config.json, metrics.json"):
        load_artifact(model)
    partial = {"format": "tl_deploy.model", "files": {"config.json": sha256_file(model / "config.json")}}
    (model / "manifest.json").write_text(json.dumps(partial))
    with pytest.raises(ArtifactError, match=r"no checksum for model.safetensors, metrics.json"):
        load_artifact(model)
    assert load_artifact(model, verify=False).model.classifier.bias[0] > 5  # deliberately, it still loads


def test_non_finite_weights_are_refused_at_save(tiny_artifact: Path, tmp_path: Path) -> None:
    art = load_artifact(tiny_artifact)
    with torch.no_grad():
        art.model.classifier.weight[1, 2] = float("nan")
    out = tmp_path / "models" / "nan"
    with pytest.raises(ArtifactError, match=r"1 weight tensor\(s\) hold NaN or infinity \(classifier.weight\)"):
        save_artifact(out, art.model, architecture=art.architecture, class_names=art.class_names, spec=art.spec,
                      training={}, metrics={})
    assert not (tmp_path / "models").exists()  # nothing written, not even a temp folder


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(value: float, tiny_artifact: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_artifact, model)

    def poison(state: dict[str, torch.Tensor]) -> None:
        state["classifier.weight"][0, 0] = value

    _rewrite_weights(model, poison)
    _reseal(model)  # checksums match: only the values betray it
    for verify in (True, False):
        with pytest.raises(ArtifactError, match=r"Refusing .*model.safetensors: 1 weight tensor\(s\) hold NaN"):
            load_artifact(model, verify=verify)


@pytest.mark.parametrize("strategy", ["linear", "lp-ft"])
def test_diverged_training_ends_with_one_line_and_writes_nothing(strategy: str, tiny_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.finetune import main

    out = tmp_path / "run"
    # Fine-tuning options only where there is a fine-tuning phase (linear refuses them).
    finetuning = [] if strategy == "linear" else ["--epochs", "1", "--no-augment", "--lr", "1e30"]
    rc = main(["--data", str(tiny_data), "--model", TINY_MODEL, "--weights", "none", "--img-size", str(TINY_SIZE),
               "--strategy", strategy, *finetuning, "--probe-epochs", "1", "--batch-size", "16",
               "--no-cache", "--workers", "0", "--probe-lr", "1e30",
               "--out", str(out)])  # a finite learning rate that overflows the weights
    assert rc != 0
    _one_error_line(capsys.readouterr().err, "hold NaN or infinity")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no artifact, no checkpoint, no temp folder


# --------------------------------------------------------------------------- item 5: the graph against its metadata


def _graph_file(path: Path, *, inputs: int = 1, out_rank: int = 2, dtype: int = 1, size: int = TINY_SIZE,
                **meta: object) -> Path:
    """A small valid-looking ONNX classifier (mean of each channel = 3 logits) with chosen flaws."""
    import onnx
    from onnx import TensorProto, helper

    from tl_deploy.formats.metadata import OnnxMetadata
    from tl_deploy.preprocess import PreprocessSpec

    names = [f"x{i}" for i in range(inputs)]
    shape = ["N", 3, size, size] if dtype == TensorProto.FLOAT else ["N", size, size, 3]
    nodes = [helper.make_node("Sum", names, ["s"])]
    axes = [2, 3] if out_rank == 2 else [1, 2, 3]
    nodes.append(helper.make_node("ReduceMean", ["s"], ["logits"], axes=axes, keepdims=0))
    out_shape = ["N", 3] if out_rank == 2 else ["N"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, dtype, shape) for n in names],
                              [helper.make_tensor_value_info("logits", dtype, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    props = OnnxMetadata(class_names=("circle", "square", "bar"), spec=PreprocessSpec(input_size=TINY_SIZE,
                         resize=TINY_SIZE), source_checksum="0" * 64, architecture="mean").to_props()
    props.update({f"tl_deploy.{k}": v if k == "input_layout" else json.dumps(v)
                  for k, v in meta.items()})
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_a_consistent_graph_loads(tmp_path: Path) -> None:
    import numpy as np

    from tl_deploy.runtime import load

    clf = load(_graph_file(tmp_path / "ok.onnx"))
    assert clf.class_names == ["circle", "square", "bar"]
    assert clf.predict(np.zeros((40, 40, 3), dtype=np.uint8)).labels[0][0] in clf.class_names


@pytest.mark.parametrize("case,build,message", [
    ("3 names, 2 classes", dict(class_names=["circle", "square"]), "lists 2 class names: expected \\(N, 2\\)"),
    ("wrong input_size", dict(preprocess={"input_size": 40, "resize": 40}), "input_size 40"),
    ("uint8 layout on a float graph", dict(input_layout="uint8_nhwc"), "asks for \\(N, H, W, 3\\) uint8"),
    ("1-D output", dict(out_rank=1), "output 'logits' is tensor\\(float\\) \\['N'\\]"),
    ("two inputs", dict(inputs=2), "2 inputs \\(x0, x1\\)"),
    ("names as one string", dict(class_names="abc"), "class_names must be a list of strings, got str"),
    ("repeated names", dict(class_names=["circle", "circle", "bar"]), "repeats \\['circle'\\]"),
    ("non-string names", dict(class_names=[1, 2, 3]), "non-empty strings, got 1"),
])
def test_graph_that_disagrees_with_its_metadata_is_refused_at_load(case: str, build: dict[str, object],
                                                                    message: str, tmp_path: Path) -> None:
    from tl_deploy.runtime import load

    shape_args = {k: build.pop(k) for k in ("inputs", "out_rank") if k in build}
    if "preprocess" in build:
        from tl_deploy.preprocess import PreprocessSpec

        build["preprocess"] = PreprocessSpec(**build["preprocess"]).to_dict()  # type: ignore[arg-type]
    path = _graph_file(tmp_path / "bad.onnx", **shape_args, **build)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)  # the error names the file


def _edit_config(model: Path, edit) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    _reseal(model)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["architecture"].update(num_classes=3.5), "num_classes must be an integer, got 3.5"),
    (lambda c: c["architecture"].update(num_classes="3"), "num_classes must be an integer, got '3'"),
    (lambda c: c.update(class_names="abc"), "class_names must be a list of strings, got str"),
    (lambda c: c.update(class_names=["circle", "circle", "bar"]), "repeats \\['circle'\\]"),
])
def test_artifact_config_class_list_and_num_classes_are_checked(edit, message: str,  # type: ignore[no-untyped-def]
                                                                tiny_artifact: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_artifact, model)
    _edit_config(model, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(model)


def test_graph_problems_accepts_engine_style_dynamic_dims() -> None:
    from tl_deploy.formats.metadata import OnnxMetadata, graph_problems
    from tl_deploy.preprocess import PreprocessSpec

    meta = OnnxMetadata(class_names=("a", "b", "c"), spec=PreprocessSpec(input_size=32, resize=32),
                        source_checksum="0" * 64, architecture="x")
    ok_in, ok_out = [("input", "tensor(float)", [-1, 3, 32, 32])], [("logits", "tensor(float)", [-1, 3])]
    assert graph_problems(meta, ok_in, ok_out) == []
    assert graph_problems(meta, ok_in, [("logits", "tensor(float)", [-1, 4])])  # buffer sized for 3: refused
    assert graph_problems(meta, [("input", "tensor(float)", [-1, 3, 40, 40])], ok_out)
