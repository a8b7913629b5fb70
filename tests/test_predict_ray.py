"""predict --ray: a local Ray Data run gives the single-process rows; --on-bad-image fail and --resume; the
flags' refusals; without ray installed, one line and nothing touched.

One local Ray session (2 CPUs) serves the whole module; each Ray run starts its own actor pool.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TINY_CLASSES
from tl_deploy.errors import ArtifactError
from tl_deploy.predict import LineWriter, main, read_rows
from tl_deploy.predict_ray import LOCAL, RaySettings, run_ray_predictions

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed: pip install 'tl_deploy[ray]' (the dev extra has it)")
TOP_K = "2"
BATCH = "5"  # the 25 inputs make 5 batches, shared by 2 actors


def run(model: Path, *args: str | Path) -> int:
    return main([str(model), *(str(a) for a in args), "--top-k", TOP_K, "--batch-size", BATCH, "--threads", "1",
                 "--no-progress"])


@pytest.fixture(scope="module")
def model(export_dir: Path) -> Path:
    return export_dir / "model.onnx"  # FP32 on onnxruntime: the same numbers on every machine


@pytest.fixture(scope="module")
def images(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test split (class folders, 24 images) plus one file that is not an image."""
    root = tmp_path_factory.mktemp("ray_inputs") / "test"
    shutil.copytree(tiny_data / "test", root)
    (root / TINY_CLASSES[0] / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """A local Ray with 2 CPUs, started by predict's own ``start_ray``; every ``--ray`` run joins it."""
    import ray

    from tl_deploy.predict_ray import start_ray

    started = start_ray(RaySettings(LOCAL, actors=2, threads=1))
    yield ray
    if started:
        ray.shutdown()


def by_path(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    table = {r["path"]: r for r in rows}
    assert len(table) == len(rows)  # each input once
    return table


def assert_same_rows(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for path, row in want.items():
        other = got[path]
        assert (other["labels"], other["backend"], other["precision"], other["error"]) == \
            (row["labels"], row["backend"], row["precision"], row["error"]), path
        np.testing.assert_allclose(other["probabilities"], row["probabilities"], rtol=1e-5, atol=1e-7)


def single_process(model: Path, images: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    assert run(model, images, "--out", out) == 0
    return by_path(out), capsys.readouterr().out


@needs_ray
def test_ray_gives_the_single_process_rows_summary_and_accuracy(ray_session: Any, model: Path, images: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    want, want_out = single_process(model, images, tmp_path / "single.jsonl", capsys)
    out = tmp_path / "ray.jsonl"
    assert run(model, images, "--out", out, "--ray") == 0
    got_out = capsys.readouterr().out
    got = by_path(out)
    assert_same_rows(got, want)
    broken = got[str(images / TINY_CLASSES[0] / "broken.png")]
    assert broken["labels"] == [] and "Not a readable image" in broken["error"]
    assert "25 images" in got_out and "1 unreadable" in got_out and "Ray local: 2 actors x 1 thread" in got_out
    accuracy = want_out[want_out.index("class folders:"):want_out.index("wrote ")]
    assert accuracy.startswith("class folders: accuracy") and accuracy in got_out  # table and confusion matrix too


@needs_ray
def test_ray_on_bad_image_fail_stops_then_resume_completes(ray_session: Any, model: Path, images: Path,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    want, _ = single_process(model, images, tmp_path / "single.jsonl", capsys)
    out = tmp_path / "ray.csv"
    assert run(model, images, "--out", out, "--ray", "--on-bad-image", "fail") == 1
    err = capsys.readouterr().err
    assert "error: " in err and "broken.png" in err and "--on-bad-image fail" in err
    kept = read_rows(out, int(TOP_K))
    assert len(kept) % int(BATCH) == 0 and not any(r.error for r in kept)  # whole batches before the bad one

    assert run(model, images, "--out", out, "--ray", "--resume") == 0
    assert f"{len(kept)} already in" in capsys.readouterr().out
    rows = read_rows(out, int(TOP_K))
    assert [r.path for r in rows[:len(kept)]] == [r.path for r in kept]  # nothing earlier rewritten
    got = {r.path: {"labels": list(r.labels), "probabilities": list(r.probabilities), "backend": r.backend,
                    "precision": r.precision, "error": r.error or None} for r in rows}
    assert len(got) == len(rows)
    assert_same_rows(got, want)


@needs_ray
def test_a_model_an_actor_cannot_load_is_raised_as_its_own_error(ray_session: Any, images: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    writer = LineWriter(out, int(TOP_K))
    settings = RaySettings(LOCAL, actors=1, threads=1)
    with pytest.raises(ArtifactError, match="^on a Ray actor: Model not found"):  # e.g. not on that node's disk
        run_ray_predictions(tmp_path / "elsewhere", sorted(images.rglob("*.png")), writer, settings=settings,
                            backend="auto", precision="auto", verify=True, top_k=int(TOP_K), batch_size=int(BATCH),
                            progress=False)
    writer.close()
    assert out.read_text() == ""


def test_without_ray_one_line_and_nothing_touched(model: Path, images: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    import tl_deploy.runtime

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before --ray was refused")

    monkeypatch.setattr(tl_deploy.runtime, "load", no_loading)
    out = tmp_path / "earlier.csv"
    out.write_text("earlier rows\n")
    for extra in ([], ["--resume"]):
        assert run(model, images, "--out", out, "--ray", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --ray needs Ray Data") and \
            "pip install 'tl_deploy[ray]'" in err[0]
    assert out.read_text() == "earlier rows\n"
    assert run(model, images, "--out", tmp_path / "new.jsonl", "--ray=auto") == 2
    assert not (tmp_path / "new.jsonl").exists()


@pytest.mark.parametrize(("flags", "message"), [(["--actors", "2"], "--actors does nothing without --ray"),
                                                (["--ray", "--workers", "1"], "--workers does nothing with --ray"),
                                                (["--ray", "--streams", "2"], "--streams does nothing with --ray")])
def test_ray_flags_that_do_nothing_are_refused(model: Path, images: Path, tmp_path: Path, flags: list[str],
                                               message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(model, images, "--out", tmp_path / "p.jsonl", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


@needs_ray
def test_threads_no_node_holds_are_refused_before_the_output_exists(ray_session: Any, model: Path, images: Path,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.csv"
    assert main([str(model), str(images), "--out", str(out), "--ray", "--threads", "3", "--no-progress"]) == 2
    assert "--threads 3: no node of the Ray cluster has that many CPUs (the most: 2)" in capsys.readouterr().err
    assert not out.exists()  # an actor of 3 CPUs would have waited for ever
