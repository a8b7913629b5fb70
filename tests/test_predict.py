"""predict: every output format, error rows, resume after a torn line, refusals, class-folder accuracy."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_CLASSES
from tl_deploy.errors import DataError
from tl_deploy.predict import collect_inputs, csv_header, decoded_batches, main, read_rows
from tl_deploy.preprocess import PreprocessSpec, prepare

TEST_IMAGES = 8 * len(TINY_CLASSES)  # tiny_data's test split


def run(model: Path, *args: str | Path) -> int:
    return main([str(model), *(str(a) for a in args), "--threads", "2", "--workers", "2", "--streams", "2",
                 "--no-progress"])


@pytest.fixture(scope="module")
def model(export_dir: Path) -> Path:
    return export_dir / "model.onnx"  # FP32 on onnxruntime: the same numbers on every machine


@pytest.fixture(scope="module")
def reference(model: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One uninterrupted JSONL run over the test split, the rows every other run is compared with."""
    out = tmp_path_factory.mktemp("predict") / "ref.jsonl"
    assert run(model, tiny_data / "test", "--out", out, "--top-k", "2", "--batch-size", "5") == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_jsonl_rows(reference: list[dict]) -> None:
    assert len(reference) == TEST_IMAGES
    assert len({r["path"] for r in reference}) == TEST_IMAGES
    for row in reference:
        assert row["error"] is None and row["backend"] == "onnxruntime" and row["precision"] == "fp32"
        assert len(row["labels"]) == 2 and set(row["labels"]) <= set(TINY_CLASSES)
        assert row["probabilities"][0] >= row["probabilities"][1] > 0


def test_csv_and_parquet_hold_the_same_rows(model: Path, tiny_data: Path, tmp_path: Path,
                                            reference: list[dict]) -> None:
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"p{suffix}"
        assert run(model, tiny_data / "test", "--out", out, "--top-k", "2", "--batch-size", "7") == 0
        if suffix == ".csv":
            with open(out, newline="") as fh:
                records = list(csv.reader(fh))
            assert records[0] == csv_header(2)
            got = [(r[0], [r[1], r[3]], [float(r[2]), float(r[4])]) for r in records[1:]]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(out).to_pylist()
            assert {row["error"] for row in table} == {None}
            got = [(r["path"], r["labels"], r["probabilities"]) for r in table]
        assert [g[:2] for g in got] == [(r["path"], r["labels"]) for r in reference]
        np.testing.assert_allclose([g[2] for g in got], [r["probabilities"] for r in reference], rtol=1e-4)


def test_decoding_inline_or_in_a_pool_gives_the_same_rows(model: Path, tiny_data: Path, tmp_path: Path,
                                                          reference: list[dict]) -> None:
    for workers in ("0", "3"):
        out = tmp_path / f"w{workers}.jsonl"
        assert main([str(model), str(tiny_data / "test"), "--out", str(out), "--top-k", "2", "--batch-size", "5",
                     "--threads", "2", "--workers", workers, "--no-progress"]) == 0
        assert [json.loads(line) for line in out.read_text().splitlines()] == reference


@pytest.mark.parametrize("streams", ["1", "3"])
def test_batches_inferred_at_once_give_the_same_rows(model: Path, tiny_data: Path, tmp_path: Path,
                                                     reference: list[dict], streams: str) -> None:
    """Batches of 2 (12 of them) on 1 or 3 streams, 2 decoding ahead: the rows of 2 streams, in order.
    A batch's array written over while it is still inferred would show as other images' labels."""
    out = tmp_path / f"s{streams}.jsonl"
    assert main([str(model), str(tiny_data / "test"), "--out", str(out), "--top-k", "2", "--batch-size", "2",
                 "--threads", "3", "--workers", "2", "--streams", streams, "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["path"], r["labels"]) for r in rows] == [(r["path"], r["labels"]) for r in reference]
    np.testing.assert_allclose([r["probabilities"] for r in rows], [r["probabilities"] for r in reference],
                               rtol=1e-5)  # other thread counts per call: other float summation orders


@pytest.mark.parametrize("held", [1, 2, 3])
def test_a_reused_array_is_written_over_only_after_held_newer_batches(tiny_data: Path, held: int) -> None:
    spec = PreprocessSpec(input_size=16, resize=16)
    paths = collect_inputs([str(tiny_data / "test")])[:14]
    expected = [np.stack([prepare(p, spec) for p in paths[i:i + 2]]) for i in range(0, len(paths), 2)]
    got = []
    for i, batch in enumerate(decoded_batches(paths, spec, 2, 0, reuse=True, held=held)):
        got.append(batch.images)
        for j in range(max(0, i - held + 1), i + 1):  # the batches the consumer may still use: intact
            np.testing.assert_array_equal(got[j], expected[j])
    assert len({a.__array_interface__["data"][0] for a in got}) == held  # inline decoding: held arrays in turn


def test_unreadable_images_get_an_error_row_and_are_counted(model: Path, tiny_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_data / "test" / "circle", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    assert run(model, folder, "--out", out) == 0
    assert "1 unreadable" in capsys.readouterr().out
    rows = {r.path: r for r in read_rows(out, len(TINY_CLASSES))}
    assert len(rows) == 9
    broken = rows[str(folder / "broken.png")]
    assert broken.labels == () and "Not a readable image" in broken.error
    assert sum(1 for r in rows.values() if r.error) == 1


def test_on_bad_image_fail_stops_with_exit_1(model: Path, tiny_data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = tmp_path / "p.jsonl"
    assert run(model, tiny_data / "test" / "bar", bad, "--out", out, "--batch-size", "4",
               "--on-bad-image", "fail") == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after the loading log lines
    assert err.startswith("error: ") and "bad.png" in err and "the 8 rows before it are in the output" in err
    assert len(out.read_text().splitlines()) == 8  # the two whole batches before the bad one, both in flight


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_after_a_torn_last_line_gives_the_rows_of_one_run(model: Path, tiny_data: Path, tmp_path: Path,
                                                                 reference: list[dict], suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    assert run(model, tiny_data / "test", "--out", full, "--top-k", "2", "--batch-size", "5") == 0
    lines = full.read_bytes().splitlines(keepends=True)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(b"".join(lines[:11]) + lines[11][: len(lines[11]) // 2])  # killed inside a write
    assert run(model, tiny_data / "test", "--out", cut, "--top-k", "2", "--batch-size", "5", "--resume") == 0
    assert cut.read_bytes() == full.read_bytes()
    assert [r.path for r in read_rows(cut, 2)] == [r["path"] for r in reference]


def test_resume_with_nothing_left_writes_nothing(model: Path, tiny_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.jsonl"
    assert run(model, tiny_data / "test", "--out", out) == 0
    before = out.read_bytes()
    assert run(model, tiny_data / "test", "--out", out, "--resume") == 0
    assert out.read_bytes() == before
    summary = capsys.readouterr().out
    assert "predicted 0 images" in summary and f"{TEST_IMAGES} already in" in summary


def test_class_folders_give_accuracy_and_confusion(model: Path, tiny_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   reference: list[dict]) -> None:
    assert run(model, tiny_data / "test", "--out", tmp_path / "p.jsonl", "--top-k", "2") == 0
    out = capsys.readouterr().out
    hits = sum(Path(r["path"]).parent.name == r["labels"][0] for r in reference)
    assert f"class folders: accuracy {100 * hits / TEST_IMAGES:.2f}% ({TEST_IMAGES} images)" in out
    assert "confusion matrix" in out

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted((tiny_data / "test").rglob("*.png"))[:4]):
        shutil.copy(path, flat / f"{i}.png")
    assert run(model, flat, "--out", tmp_path / "flat.csv") == 0
    assert "accuracy" not in capsys.readouterr().out


def test_inputs_from_globs_and_list_files(tiny_data: Path, tmp_path: Path) -> None:
    test = tiny_data / "test"
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{test / 'bar' / '000.png'}\n\n{test / 'bar' / '001.png'}\n")
    paths = collect_inputs([f"@{listing}", str(listing), str(test / "circle" / "*.png"), str(test / "circle")])
    assert paths[:2] == [test / "bar" / "000.png", test / "bar" / "001.png"]
    assert len(paths) == 2 + 8  # each path once, in the order first named
    recursive = collect_inputs([str(tiny_data / "**" / "00[01].png")])
    assert len(recursive) == 2 * len(TINY_CLASSES) * 3
    with pytest.raises(DataError, match="matches no image"):
        collect_inputs([str(test / "*.jpg")])


def test_refusals_come_before_any_work(model: Path, tiny_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    images = tiny_data / "test" / "bar"
    existing = tmp_path / "old.csv"
    existing.write_text("keep me\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    cases = [
        ([tmp_path / "nope", images, "--out", tmp_path / "a.csv"], 1, "Model not found"),
        ([model, tmp_path / "missing.png", "--out", tmp_path / "a.csv"], 1, "Input not found"),
        ([model, empty, "--out", tmp_path / "a.csv"], 1, "holds no image"),
        ([model, images, "--out", tmp_path / "a.txt"], 2, "unknown output format"),
        ([model, images, "--out", existing], 2, "exists: add --resume"),
        ([model, images, "--out", tmp_path / "a.parquet", "--resume"], 2, "--resume does nothing"),
        ([model, images, "--out", existing / "a.csv"], 1, "Cannot write"),
        ([model, images, "--out", tmp_path / "a.csv", "--top-k", "4"], 2, "more than the model's 3 classes"),
    ]
    for argv, code, message in cases:
        assert run(*argv) == code, argv  # type: ignore[arg-type]
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (argv, err)
        assert not any("loaded" in line for line in err) or "--top-k" in argv, (argv, err)  # before loading
    assert existing.read_text() == "keep me\n"
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "a.parquet").exists()


def test_parquet_without_pyarrow_is_refused(model: Path, tiny_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert run(model, tiny_data / "test" / "bar", "--out", tmp_path / "p.parquet") == 2
    assert "needs pyarrow" in capsys.readouterr().err
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(model: Path, tiny_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert run(model, tiny_data / "test" / "bar", "--out", locked / "p.csv") == 1
        assert "Cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
