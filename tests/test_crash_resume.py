"""Crashes and full disks: kill -9 then --resume equals an uninterrupted run; unwritable or full
outputs are refused before training; an interrupted write never leaves a file that loads as whole."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tl_deploy import fileio
from tl_deploy.artifact import load_artifact, save_artifact
from tl_deploy.data import load_splits
from tl_deploy.errors import OutputError
from tl_deploy.finetune import main
from tl_deploy.train import checkpoint, recipe
from tl_deploy.train.recipe import fit

from .conftest import TINY_MODEL, TINY_SIZE
from .test_finetune import assert_one_error_line, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _cli_args(data: Path, out: Path, epochs: int) -> list[str]:
    """The CLI form of ``tiny_config(data, out, epochs=epochs, deterministic=True)``."""
    return ["--data", str(data), "--model", TINY_MODEL, "--weights", "none", "--img-size", str(TINY_SIZE),
            "--strategy", "finetune", "--epochs", str(epochs), "--batch-size", "8", "--lr", "1e-2",
            "--backbone-lr-mult", "1.0", "--no-augment", "--warmup-epochs", "0.5", "--no-cache", "--workers", "0",
            "--deterministic", "--amp", "off", "--device", "cpu", "--out", str(out)]


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.Popen([sys.executable, "-m", "tl_deploy.finetune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after_first_checkpoint(data: Path, out: Path, epochs: int) -> float:
    """Start a run, SIGKILL it at a random moment after its first checkpoint; return the delay used."""
    meta = out.parent / f".{out.name}.checkpoint" / "meta.json"
    for delay in (random.uniform(0.0, 0.3), 0.0):  # retry at once if the run outpaced the kill
        shutil.rmtree(meta.parent, ignore_errors=True)
        proc = _spawn(_cli_args(data, out, epochs))
        try:
            deadline = time.monotonic() + 900  # generous: a loaded CI machine may start slowly
            while not meta.exists() and proc.poll() is None:  # the first complete checkpoint (end of epoch 1)
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
            time.sleep(delay)  # a random moment: mid-epoch, or in the middle of a checkpoint write
        finally:
            proc.send_signal(signal.SIGKILL)  # also when the wait failed: never leave the run behind
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            return delay
        assert proc.returncode == 0, err[-2000:]
        shutil.rmtree(out)
    pytest.fail("the run finished before it could be killed, twice")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    epochs = 6
    out = tmp_path / "killed"
    delay = _kill_after_first_checkpoint(tiny_data, out, epochs)
    assert not out.exists()  # no half-written artifact
    assert (tmp_path / ".killed.checkpoint" / "meta.json").exists()

    resumed = _spawn(_cli_args(tiny_data, out, epochs) + ["--resume"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "resumed" in err and "epochs done" in err, err[-2000:]
    assert not (tmp_path / ".killed.checkpoint").exists()  # removed once the artifact is complete

    # The reference runs the same way (a fresh process): thread counts set by other tests in this one
    # would change float reduction order, not the resume logic under test.
    full = tmp_path / "full"
    reference = _spawn(_cli_args(tiny_data, full, epochs))
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]
    expected, got = load_artifact(full).model.state_dict(), load_artifact(out).model.state_dict()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), f"{key} differs after kill at +{delay:.2f}s and --resume"


def test_a_torn_checkpoint_write_resumes_from_the_previous_one(tiny_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the new state file is written but before meta.json names it."""
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=2, deterministic=True)
    real_json = checkpoint.atomic_write_json
    calls = {"n": 0}

    def die_before_second_meta(path, obj):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands for the kill: the state file of epoch 2 exists, its meta does not
        real_json(path, obj)

    monkeypatch.setattr(checkpoint, "atomic_write_json", die_before_second_meta)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg)
    ckpt_dir = tmp_path / ".run.checkpoint"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["meta.json", "state-finetune-1.pt", "state-finetune-2.pt"]
    monkeypatch.setattr(checkpoint, "atomic_write_json", real_json)
    loaded = checkpoint.Checkpointer(tmp_path / "run", checkpoint.fingerprint(cfg, load_splits(tiny_data)))
    state = loaded.load()
    assert state is not None and state["run_state"]["epoch"] == 1  # the last complete one, not a restart
    resumed = load_artifact(fit(replace(cfg, resume=True))).model.state_dict()
    full = load_artifact(fit(replace(cfg, out=str(tmp_path / "full")))).model.state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in full.items())


def test_unwritable_output_is_refused_before_any_work(tiny_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    def must_not_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("data was loaded before the output check")

    monkeypatch.setattr(recipe, "load_splits", must_not_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="which is a file, not a folder"):
        fit(tiny_config(tiny_data, blocker / "run"))
    rc = main(["--data", str(tiny_data), "--model", TINY_MODEL, "--out", str(blocker / "run")])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, "choose another --out")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="Permission denied"):
            fit(tiny_config(tiny_data, locked / "run"))


def test_full_disk_is_refused_before_any_work(tiny_data: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, "load_splits", lambda *a, **k: pytest.fail("data loaded before the disk check"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: usage._replace(free=50 * 2**20))
    with pytest.raises(OutputError, match="Only 50 MiB free .* need at least 200 MiB"):
        fit(tiny_config(tiny_data, tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []  # the probe file is gone too


def test_disk_full_mid_run_is_one_line_and_resumable(tiny_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    real = checkpoint.atomic_write_bytes
    calls = {"n": 0}

    def fills_up(path, data):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", fills_up)
    out = tmp_path / "run"
    args = _cli_args(tiny_data, out, 2)
    assert main(args) == 1
    assert_one_error_line(capsys.readouterr().err, "No space left on device writing")
    assert not out.exists()
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", real)
    assert main(args + ["--resume"]) == 0
    assert "resumed" in capsys.readouterr().err
    load_artifact(out)


def test_interrupted_artifact_write_keeps_the_old_one(tiny_artifact: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while building the new folder, or at either rename of the swap, leaves the previous
    artifact in place and whole, and no temporary folder behind."""
    from tl_deploy import artifact

    dest = tmp_path / "model"
    shutil.copytree(tiny_artifact, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    old = load_artifact(dest)
    real_replace, real_sha = os.replace, artifact.sha256_file
    for fault in ("while writing", "first rename", "second rename"):
        calls = {"n": 0}

        def crash(src, dst, _at=2 if fault == "second rename" else 1, _calls=calls):  # type: ignore[no-untyped-def]
            _calls["n"] += 1
            if _calls["n"] == _at:
                raise KeyboardInterrupt
            real_replace(src, dst)

        if fault == "while writing":
            monkeypatch.setattr(artifact, "sha256_file", lambda p: (_ for _ in ()).throw(KeyboardInterrupt()))
        else:
            monkeypatch.setattr(fileio.os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            save_artifact(dest, torch.nn.Linear(2, 3), architecture=old.architecture, class_names=old.class_names,
                          spec=old.spec, training={}, metrics={})
        monkeypatch.setattr(fileio.os, "replace", real_replace)
        monkeypatch.setattr(artifact, "sha256_file", real_sha)
        assert {p.name: p.read_bytes() for p in dest.iterdir()} == before, fault
        assert [p.name for p in tmp_path.iterdir()] == ["model"], fault
        load_artifact(dest)
