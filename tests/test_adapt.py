"""tl-deploy adapt: each method changes what it should and nothing else, lineage, guard rails, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tl_deploy.adapt import AdaptConfig, CollapseError, adapt_artifact, default_out, label_free_doubt, main
from tl_deploy.artifact import load_artifact
from tl_deploy.fileio import read_json, sha256_file
from tl_deploy.train.target_stats import target_stats

# Small and deterministic: every tiny-data train image, 2 epochs of 4 steps.
FAST = dict(limit=None, epochs=2, batch_size=16, seed=0)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_artifact(path).model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _is_bn(name: str, bn_modules: set[str]) -> bool:
    return name.rsplit(".", 1)[0] in bn_modules


@pytest.fixture(scope="module")
def bn_modules(tiny_artifact: Path) -> set[str]:
    model = load_artifact(tiny_artifact).model
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


@pytest.fixture(scope="module")
def shot_dir(tiny_artifact: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "tiny-shot"
    adapt_artifact(tiny_artifact, tiny_data, AdaptConfig(method="shot", lr=1e-2, **FAST), out, device="cpu")
    return out


def _files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_adabn_changes_only_batchnorm_statistics(tiny_artifact: Path, tiny_data: Path, tmp_path: Path,
                                                 bn_modules: set[str]) -> None:
    out = tmp_path / "adabn"
    adapt_artifact(tiny_artifact, tiny_data, AdaptConfig(method="adabn", limit=None), out, device="cpu")
    changed = _changed(_state(tiny_artifact), _state(out))
    assert changed, "AdaBN changed nothing"
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed), changed
    assert any(k.endswith("running_mean") for k in changed)


def test_tent_changes_batchnorm_affine_and_statistics_only(tiny_artifact: Path, tiny_data: Path, tmp_path: Path,
                                                            bn_modules: set[str]) -> None:
    out = tmp_path / "tent"
    adapt_artifact(tiny_artifact, tiny_data, AdaptConfig(method="tent", lr=1e-2, **FAST), out, device="cpu")
    changed = _changed(_state(tiny_artifact), _state(out))
    assert all(_is_bn(k, bn_modules) for k in changed), sorted(k for k in changed if not _is_bn(k, bn_modules))
    assert any(k.endswith(".weight") for k in changed) and any(k.endswith(".bias") for k in changed)


def test_shot_keeps_the_classifier_and_the_batchnorm_statistics(tiny_artifact: Path, shot_dir: Path,
                                                                bn_modules: set[str]) -> None:
    changed = _changed(_state(tiny_artifact), _state(shot_dir))
    assert not [k for k in changed if k.startswith("classifier.")]
    assert not [k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(not _is_bn(k, bn_modules) for k in changed), "no convolution was trained"


def test_lineage_and_target_test_are_recorded(tiny_artifact: Path, tiny_data: Path, shot_dir: Path) -> None:
    config = read_json(shot_dir / "config.json")
    lineage = config["adaptation"]
    assert lineage["source"]["weights_sha256"] == sha256_file(tiny_artifact / "model.safetensors")
    assert lineage["source"]["path"] == str(tiny_artifact)
    assert lineage["method"] == "shot" and lineage["settings"]["lr"] == 1e-2
    assert lineage["target"] == {"folder": str(tiny_data), "images": 72, "images_in_folder": 72}
    assert lineage["seconds"] > 0
    for key in ("before", "after"):
        assert set(lineage["target_stats"][key]) >= {"mean_entropy", "effective_classes", "class_fractions"}
    assert lineage["target_stats"]["after"]["agreement"] is not None
    assert "doubt" in lineage and lineage["collapse"] is None
    assert lineage["target_test"]["images"] == 24
    assert 0.0 <= lineage["target_test"]["acc_after"] <= 1.0
    # the rest of the config is that of any artifact: every consumer reads it
    assert config["class_names"] == read_json(tiny_artifact / "config.json")["class_names"]


def test_source_artifact_is_untouched(tiny_artifact: Path, tiny_data: Path, tmp_path: Path) -> None:
    before = _files(tiny_artifact)
    adapt_artifact(tiny_artifact, tiny_data, AdaptConfig(method="tent", **FAST), tmp_path / "t", device="cpu")
    assert _files(tiny_artifact) == before


def test_adapted_artifact_loads_and_exports(shot_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    from tl_deploy.export import ExportOptions, export_artifact

    art = load_artifact(shot_dir)
    assert art.config["adaptation"]["method"] == "shot"
    rows = export_artifact(shot_dir, tmp_path / "export", ExportOptions())
    assert [row.file for row in rows] == ["model.onnx"]
    assert (tmp_path / "export" / "model.onnx").is_file()


def test_collapse_is_refused_and_nothing_written(tiny_artifact: Path, tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import tl_deploy.adapt as adapt_module

    def collapse(model: torch.nn.Module, *args: object) -> None:
        with torch.no_grad():  # every image -> class 0, as a DANN whose discriminator won
            model.get_classifier().bias.copy_(torch.tensor([1e4, 0.0, 0.0]))  # type: ignore[operator]

    monkeypatch.setattr(adapt_module, "run_method", collapse)
    out = tmp_path / "collapsed"
    with pytest.raises(CollapseError, match="collapsed to 1.0 effective classes"):
        adapt_artifact(tiny_artifact, tiny_data, AdaptConfig(method="shot", **FAST), out, device="cpu")
    assert not out.exists()
    code = main([str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: not writing") and "--force" in err[-1]
    assert not out.exists()
    assert main([str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--out", str(out), "--device", "cpu",
                 "--force"]) == 0
    lineage = read_json(out / "config.json")["adaptation"]
    assert lineage["written_despite_collapse"] and "collapsed" in lineage["collapse"]


def test_label_free_doubt_flags_less_confident_or_fewer_classes() -> None:
    sure = target_stats(torch.eye(3).repeat(4, 1) * 10)  # confident, balanced
    unsure = target_stats(torch.eye(3).repeat(4, 1) * 0.5)
    narrow = target_stats(torch.tensor([[10.0, 0, 0]] * 11 + [[0, 10.0, 0]]))
    assert label_free_doubt(sure, unsure) is None
    assert "entropy rose" in (label_free_doubt(unsure, sure) or "")
    assert "effective classes fell" in (label_free_doubt(narrow, sure) or "")


def test_default_out_is_next_to_the_source() -> None:
    assert default_out(Path("models/run"), "shot", Path("data/site-b/")) == Path("models/run-adapted-shot-site-b")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors, as for every verb
        code = int(exc.code or 0)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_bad_input(tiny_artifact: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no-images"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    cases = [
        ((str(tmp_path / "missing"), "--target-unlabeled", str(tiny_data)), 1, "not found"),
        ((str(broken), "--target-unlabeled", str(tiny_data)), 1, "Corrupt"),
        ((str(tiny_artifact), "--target-unlabeled", str(empty)), 1, "holds 0 image"),
        ((str(tiny_artifact), "--target-unlabeled", str(no_images)), 1, "holds 0 image"),
        ((str(tiny_artifact), "--target-unlabeled", str(tmp_path / "nowhere")), 1, "is not a folder"),
        ((str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--method", "dann"), 2, "invalid choice"),
        ((str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--method", "adabn", "--lr", "0.1"), 2,
         "--lr does nothing with --method adabn"),
        ((str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--out", str(tiny_artifact), "--force"), 1,
         "is the source model artifact"),
    ]
    for argv, code, message in cases:
        got, errors = _cli(capsys, *argv, "--out", str(out)) if "--out" not in argv else _cli(capsys, *argv)
        assert (got, len(errors)) == (code, 1), (argv, got, errors)
        assert message in errors[0], (argv, errors)
        assert not out.exists()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("a user's file")
    got, errors = _cli(capsys, str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--out", str(stranger),
                       "--force")
    assert got == 1 and "holds no earlier model artifact" in errors[0]
    assert [p.name for p in stranger.iterdir()] == ["keep.txt"]
    assert main([str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--out", str(out), "--method", "adabn",
                 "--device", "cpu"]) == 0
    written = _files(out)
    got, errors = _cli(capsys, str(tiny_artifact), "--target-unlabeled", str(tiny_data), "--out", str(out),
                       "--method", "adabn")
    assert got == 2 and "pass --force to replace it" in errors[0]
    assert _files(out) == written
