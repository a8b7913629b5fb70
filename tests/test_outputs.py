"""The output rule, bounded JSON, validated options and --val-split models (issue 15, items 1, 6, 8).

A run writes only into a new or empty folder or one holding its own earlier output of the same kind;
anything else is refused before any work with one ``error:`` line and is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_deploy.errors import ArtifactError, OutputError, TlDeployError

from .conftest import TINY_CLASSES, TINY_MODEL, TINY_SIZE, make_image_folder
from .test_finetune import assert_one_error_line, tiny_config

DEEP = "[" * 100_000 + "]" * 100_000  # Python's parser would recurse 100,000 times


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (files by content hash): equal snapshots mean nothing was touched."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def exit_code(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1


@pytest.fixture
def artifact(tiny_artifact: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_artifact, copy)
    return copy


@pytest.fixture(scope="module")
def fp32_export(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tl_deploy.export import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("outputs") / "export"
    export_artifact(tiny_artifact, out, ExportOptions())
    return out


# --------------------------------------------------------------------------- item 1: --out


def test_export_out_at_its_own_source_is_refused(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.export.__main__ import main

    before = snapshot(artifact)
    assert main([str(artifact), "--out", str(artifact)]) == 1
    assert_one_error_line(capsys.readouterr().err, "is the model artifact this run reads")
    assert snapshot(artifact) == before  # today: weights, config and manifest were replaced by the export


def test_export_out_at_the_parent_of_artifacts_is_refused(artifact: Path, tiny_artifact: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.export.__main__ import main

    shutil.copytree(tiny_artifact, artifact.parent / "other")
    before = snapshot(artifact.parent)
    assert main([str(artifact), "--out", str(artifact.parent)]) == 1
    assert_one_error_line(capsys.readouterr().err, "contains the model artifact this run reads")
    assert snapshot(artifact.parent) == before


def test_export_out_inside_the_source_or_at_a_file_is_refused(artifact: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.export.__main__ import main

    assert main([str(artifact), "--out", str(artifact / "sub")]) == 1
    assert_one_error_line(capsys.readouterr().err, "is inside the model artifact this run reads")
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    assert main([str(artifact), "--out", str(file)]) == 1
    assert_one_error_line(capsys.readouterr().err, "is a file, not a folder")
    assert main([str(artifact), "--out", str(file / "export")]) == 1
    assert_one_error_line(capsys.readouterr().err, "which is a file, not a folder")
    assert file.read_text() == "keep me" and not (tmp_path / ".notes.txt.old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "notes.txt"]


def test_export_replaces_its_own_earlier_export(artifact: Path, tmp_path: Path) -> None:
    from tl_deploy.export import ExportOptions, export_artifact
    from tl_deploy.runtime import load

    out = tmp_path / "export" / "tiny"
    export_artifact(artifact, out, ExportOptions())
    (out / "model.onnx").write_bytes(b"stale")  # the rerun must replace the whole folder
    export_artifact(artifact, out, ExportOptions())
    labels, _ = load(out).predict(np.zeros((TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))
    assert labels[0][0] in TINY_CLASSES
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temp or .old folder left


@pytest.mark.parametrize("case", ["data", "stranger", "file", "artifact_parent", "export"])
def test_finetune_out_that_is_not_its_own_is_refused_before_training(
        case: str, tiny_data: Path, tiny_artifact: Path, fp32_export: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.finetune import main

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    if case == "data":
        out, message = data, "is the training data this run reads"
    elif case == "stranger":
        out, message = tmp_path / "thesis", "holds no earlier model artifact"
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "thesis.txt").write_text("three years of work")
    elif case == "file":
        out, message = tmp_path / "model.txt", "is a file, not a folder"
        out.write_text("a file")
    elif case == "artifact_parent":
        out, message = tmp_path / "models", "holds no earlier model artifact"
        shutil.copytree(tiny_artifact, out / "a")
        shutil.copytree(tiny_artifact, out / "b")
    else:
        out, message = tmp_path / "export", "holds a export, not a model artifact"
        shutil.copytree(fp32_export, out)
    before, data_before = snapshot(out), snapshot(data)
    rc = main(["--data", str(data), "--model", TINY_MODEL, "--weights", "none", "--img-size", str(TINY_SIZE),
               "--strategy", "finetune", "--epochs", "1", "--no-cache", "--workers", "0", "--out", str(out)])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, message)
    assert snapshot(out) == before and snapshot(data) == data_before
    assert not (out.parent / f".{out.name}.checkpoint").exists()


def test_datasets_out_over_an_artifact_is_refused(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.datasets import main

    before = snapshot(artifact)
    assert main(["animal-shape", "--out", str(artifact)]) == 1
    assert_one_error_line(capsys.readouterr().err, "holds a model artifact, not a dataset")
    assert snapshot(artifact) == before


def test_transfer_curve_out_in_a_strangers_folder_is_refused(tiny_data: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.experiments import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "draft.md").write_text("keep me")
    assert main(["transfer-curve", "--data", str(tiny_data), "--model", TINY_MODEL, "--weights", "none",
                 "--out", str(out)]) == 1
    assert_one_error_line(capsys.readouterr().err, "holds no earlier transfer curve")
    assert (out / "draft.md").read_text() == "keep me" and sorted(out.iterdir()) == [out / "draft.md"]


def test_output_kinds_match_the_formats_written() -> None:
    from tl_deploy import artifact, datasets
    from tl_deploy.fileio import OUTPUT_KINDS
    from tl_deploy.formats import export_manifest, names
    from tl_deploy.train import transfer_curve

    assert OUTPUT_KINDS["model artifact"] == (names.ARTIFACT_CONFIG, artifact.FORMAT)
    assert OUTPUT_KINDS["export"] == (names.EXPORT_MANIFEST, export_manifest.MANIFEST_FORMAT)
    assert OUTPUT_KINDS["dataset"][0] == datasets.DATASET_JSON
    assert OUTPUT_KINDS["transfer curve"] == ("results.json", transfer_curve.RESULTS_FORMAT)


# --------------------------------------------------------------------------- item 1: reports


def test_evaluate_json_into_the_artifact_is_refused(artifact: Path, tiny_data: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.evaluate import main

    before = snapshot(artifact)
    for target in (artifact / "config.json", artifact / "report.json"):
        assert exit_code(main, [str(artifact), "--data", str(tiny_data), "--report", str(target)]) == 1
        assert_one_error_line(capsys.readouterr().err, "is inside the model artifact")
    assert snapshot(artifact) == before


def test_evaluate_json_at_a_folder_under_a_file_or_over_a_model_is_refused(
        artifact: Path, tiny_data: Path, fp32_export: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.evaluate import main

    folder = tmp_path / "reports"
    folder.mkdir()
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    model = tmp_path / "model.onnx"
    shutil.copy(fp32_export / "model.onnx", model)
    cases = [(folder, "is a folder"), (file / "eval.json", "which is a file, not a folder"),
             (model, "is not an earlier json report"), (tiny_data / "eval.json", "inside the data")]
    for target, message in cases:
        assert exit_code(main, [str(artifact), "--data", str(tiny_data), "--report", str(target)]) == 1
        assert_one_error_line(capsys.readouterr().err, message)
    assert file.read_text() == "keep me" and list(folder.iterdir()) == []
    assert model.read_bytes() == (fp32_export / "model.onnx").read_bytes()
    assert not (tiny_data / "eval.json").exists()


def test_parity_report_into_the_export_is_refused(tiny_artifact: Path, fp32_export: Path, tiny_data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.parity import main

    before = snapshot(fp32_export)
    rc = exit_code(main, [str(tiny_artifact), "--export", str(fp32_export), "--data", str(tiny_data),
                          "--backends", "onnx-fp32", "--report", str(fp32_export / "export")])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, "is inside the export")
    assert snapshot(fp32_export) == before  # today: export.json was overwritten by the report


def test_bench_out_under_a_file_is_refused(tiny_artifact: Path, fp32_export: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.bench import main

    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    rc = exit_code(main, [str(tiny_artifact), "--export", str(fp32_export), "--backends", "torch",
                          "--report", str(file / "bench")])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, "which is a file, not a folder")
    assert file.read_text() == "keep me"


# --------------------------------------------------------------------------- item 6: one line


@pytest.mark.parametrize("verb, args, message", [
    ("finetune", ["--label-smoothing", "5"], "--label-smoothing: 5 is out of range: choose a finite number in [0, 1)"),
    ("finetune", ["--drop-rate", "1.5"], "--drop-rate: 1.5 is out of range"),
    ("finetune", ["--workers", "-1"], "--workers: -1 is out of range: choose an integer >= 0"),
    ("finetune", ["--weight-decay", "inf"], "inf is out of range: choose a finite number >= 0"),
    ("finetune", ["--val-split", "1"], "--val-split: 1 is out of range: choose a finite number in (0, 1)"),
    ("finetune", ["--lr", "nan"], "--lr: nan is out of range"),
    ("finetune", ["--seed", "-3"], "--seed: -3 is out of range"),
    ("evaluate", ["--batch-size", "0"], "--batch-size: 0 is out of range: choose an integer >= 1"),
    ("bench", ["--seconds", "nan"], "--seconds: nan is out of range"),
    ("bench", ["--rounds", "0"], "--rounds: 0 is out of range"),
    ("bench", ["--batch", "0"], "Invalid --batch '0'"),
    ("parity", ["--device", "bogus"], "invalid device 'bogus': choose cpu, cuda or cuda:N"),
    ("parity", ["--limit", "0"], "--limit: 0 is out of range"),
    ("export", ["--calib-samples", "-5"], "--calib-samples: -5 is out of range"),
    ("export", ["--workspace-gb", "inf"], "--workspace-gb: inf is out of range"),
    ("experiments", ["--steps", "0"], "--steps: 0 is out of range"),
    ("datasets", ["--seed", "1e3"], "'1e3' is not an integer"),
])
def test_out_of_range_options_give_one_line(verb: str, args: list[str], message: str, artifact: Path,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main, base = cli_of(verb, artifact, tmp_path)
    before = snapshot(tmp_path)
    assert exit_code(main, [*base, *args]) != 0
    assert_one_error_line(capsys.readouterr().err, message)
    assert snapshot(tmp_path) == before


def cli_of(verb: str, artifact: Path, tmp: Path) -> tuple[Callable[[Sequence[str]], int], list[str]]:
    """A verb's main() and arguments that are valid apart from the one under test."""
    import importlib

    module = importlib.import_module({"export": "tl_deploy.export.__main__"}.get(verb, f"tl_deploy.{verb}"))
    out = str(tmp / "out")
    base = {
        "finetune": ["--data", str(tmp / "data"), "--model", TINY_MODEL, "--weights", "none", "--out", out],
        "evaluate": [str(artifact), "--report", str(tmp / "out.json")],
        "parity": [str(artifact), "--export", str(tmp / "export"), "--report", out],
        "bench": [str(artifact), "--export", str(tmp / "export"), "--report", out],
        "export": [str(artifact), "--out", out],
        "experiments": ["transfer-curve", "--out", out],
        "datasets": ["animal-shape", "--out", out],
    }[verb]
    return module.main, base


def test_empty_weights_file_gives_one_line(tiny_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.finetune import main

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    rc = main(["--data", str(tiny_data), "--model", TINY_MODEL, "--img-size", str(TINY_SIZE), "--weights",
               str(empty), "--out", str(tmp_path / "o")])
    assert rc == 1  # today: IndexError while formatting the error
    assert_one_error_line(capsys.readouterr().err, "the file is empty")


def test_resume_from_a_checkpoint_with_an_unexpected_key_gives_one_line(tiny_data: Path, tmp_path: Path) -> None:
    from tl_deploy.data import load_splits
    from tl_deploy.train.checkpoint import Checkpointer, RunState
    from tl_deploy.train.checkpoint import fingerprint as _fingerprint
    from tl_deploy.train.recipe import fit
    from tl_deploy.train.setup import build_network

    cfg = tiny_config(tiny_data, tmp_path / "o", strategy="finetune", epochs=1)
    ckpt = Checkpointer(tmp_path / "o", _fingerprint(cfg, load_splits(tiny_data)))
    state = build_network(cfg, len(TINY_CLASSES)).state_dict()
    payload = {"model": {**state, "stranger.weight": torch.zeros(2)}, "optimizer": None, "scheduler": None,
               "run_state": asdict(RunState(phase="finetune", epoch=1)), "best": None}
    buf = io.BytesIO()
    torch.save(payload, buf)
    ckpt.dir.mkdir()
    (ckpt.dir / "state-finetune-1.pt").write_bytes(buf.getvalue())
    ckpt.meta_file.write_text(json.dumps({"state": "state-finetune-1.pt",
                                          "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                                          "fingerprint": ckpt.fingerprint}))
    with pytest.raises(ArtifactError, match=r"checkpoint's model state does not fit this run .*stranger\.weight"):
        fit(replace(cfg, resume=True))  # today: RuntimeError from load_state_dict
    assert not (tmp_path / "o").exists()


def test_deep_json_is_one_line_everywhere(artifact: Path, fp32_export: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.artifact import load_artifact
    from tl_deploy.datasets import read_dataset_info
    from tl_deploy.evaluate import main
    from tl_deploy.formats.metadata import OnnxMetadata
    from tl_deploy.runtime import load

    (artifact / "config.json").write_text(DEEP)
    with pytest.raises(ArtifactError, match="nests 100000 levels deep, more than the 64 allowed"):
        load_artifact(artifact, verify=False)
    assert exit_code(main, [str(artifact), "--no-verify"]) == 1
    assert_one_error_line(capsys.readouterr().err, "nests 100000 levels deep")
    (artifact / "manifest.json").write_text(DEEP)
    with pytest.raises(ArtifactError, match="nests 100000 levels deep"):
        load_artifact(artifact)
    export = tmp_path / "export"
    shutil.copytree(fp32_export, export)
    (export / "export.json").write_text(DEEP)
    with pytest.raises(ArtifactError, match="nests 100000 levels deep"):
        load(export)
    with pytest.raises(ArtifactError, match="nests 100000 levels deep"):
        OnnxMetadata.from_props({"tl_deploy.class_names": DEEP})
    (tmp_path / "dataset.json").write_text(DEEP)
    assert read_dataset_info(tmp_path) is None


def test_json_depth_ignores_brackets_inside_strings() -> None:
    from tl_deploy.fileio import parse_json

    assert parse_json(json.dumps({"name": "[" * 1000, "list": [[1], {"a": "}}}"}]}), "doc")["list"][1]["a"] == "}}}"
    with pytest.raises(ValueError, match="65 levels deep"):
        parse_json("[" * 65 + "]" * 65, "doc")


def test_range_check_used_by_the_library_api(tiny_data: Path, tmp_path: Path) -> None:
    from tl_deploy.train.recipe import fit

    with pytest.raises(TlDeployError, match=r"Invalid --weight-decay inf: choose a finite number >= 0"):
        fit(tiny_config(tiny_data, tmp_path / "o", weight_decay=float("inf")))  # today: NaN weights, exit 0
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- item 8


@pytest.fixture(scope="module")
def val_split_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An artifact trained with --val-split 0.25 on data with train/ and test/ but no val/, and its export."""
    from tl_deploy.artifact import Architecture, save_artifact
    from tl_deploy.backbones import create_model
    from tl_deploy.export import ExportOptions, export_artifact
    from tl_deploy.preprocess import PreprocessSpec

    root = tmp_path_factory.mktemp("val_split")
    data = make_image_folder(root / "data", {"train": 12, "test": 4})
    torch.manual_seed(0)
    arch = Architecture(name=TINY_MODEL, num_classes=len(TINY_CLASSES), drop_rate=0.0)
    model = create_model(arch.name, num_classes=arch.num_classes, weights="none", drop_rate=0.0)
    artifact = save_artifact(root / "models" / "vs", model.eval(), architecture=arch,
                             class_names=sorted(TINY_CLASSES),
                             spec=PreprocessSpec(input_size=TINY_SIZE, resize=TINY_SIZE),
                             training={"data": str(data), "val_split": 0.25, "seed": 3}, metrics={})
    export = root / "export" / "vs"
    export_artifact(artifact, export, ExportOptions())
    return artifact, export, data


def test_evaluate_a_val_split_model_with_defaults(val_split_model: tuple[Path, Path, Path]) -> None:
    from tl_deploy.evaluate import main

    artifact, _, _ = val_split_model
    assert main([str(artifact), "--split", "val"]) == 0  # today: "has train/ but no val/ ... --val-split"
    report = json.loads((artifact.parent / "vs.eval-val.json").read_text())
    assert report["count"] == 3 * 3  # 25% of 12 per class held out, as in training
    assert main([str(artifact)]) == 0
    earlier = artifact.parent / "vs.eval-test.json"
    earlier.write_text(json.dumps({"accuracy": -1}))  # an earlier report at the path is replaced
    assert main([str(artifact), "--report", str(earlier)]) == 0
    assert json.loads(earlier.read_text())["count"] == 3 * 4


def test_parity_and_bench_check_a_val_split_model(val_split_model: tuple[Path, Path, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.bench import main as bench_main
    from tl_deploy.parity import main as parity_main

    artifact, export, _ = val_split_model
    assert parity_main([str(artifact), "--export", str(export), "--backends", "onnx-fp32"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert bench_main([str(artifact), "--export", str(export), "--backends", "onnx-fp32", "--batch", "1",
                       "--rounds", "1", "--seconds", "0.01", "--warmup", "0", "--limit", "2"]) == 0
    report = json.loads((export.parent / "vs.bench.json").read_text())
    assert "skipped" not in json.dumps(report.get("e2e_note", report))


def test_default_finetune_refuses_a_default_data_folder_built_with_other_options(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.datasets import animal_shape
    from tl_deploy.finetune import main

    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "data" / "animal-shape", {"train": 2, "val": 1, "test": 1})
    info = {"name": "animal-shape", "seed": 3, "fractions": {"train": 0.7, "val": 0.1, "test": 0.2},
            "classes": TINY_CLASSES}
    (tmp_path / "data" / "animal-shape" / "dataset.json").write_text(json.dumps(info))
    before = snapshot(tmp_path / "data")

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the user's data/animal-shape would be rebuilt")

    monkeypatch.setattr(animal_shape, "obtain_wheel", no_rebuild)
    rc = main(["--model", TINY_MODEL, "--weights", "none", "--out", str(tmp_path / "o")])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, "seed 3 instead of 0")
    assert snapshot(tmp_path / "data") == before


def test_report_rule_unit(tmp_path: Path) -> None:
    from tl_deploy.fileio import check_report_path

    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n rest")
    check_report_path(png, "--out", "png")  # an earlier plot may be replaced
    with pytest.raises(OutputError, match="not an earlier json report"):
        check_report_path(png, "--out", "json")
