"""The transfer-curve experiment on tiny data: every method, budget and seed runs and is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tl_deploy.experiments import main
from tl_deploy.train.transfer_curve import METHODS, CurveConfig, transfer_curve

from .conftest import TINY_MODEL, TINY_SIZE
from .test_finetune import assert_one_error_line


def test_transfer_curve_tiny(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "curve"
    cc = CurveConfig(data=str(tiny_data), model=TINY_MODEL, weights="none", shots=("1", "3"), seeds=2,
                     img_size=TINY_SIZE, steps=2, batch_size=4, probe_steps=5, eval_per_class=None,
                     cache_dir=str(tmp_path / "cache"), out=str(out))
    result = transfer_curve(cc)
    assert len(result["runs"]) == len(METHODS) * 2 * 2
    assert {r["train_images"] for r in result["runs"] if r["shots"] == "3"} == {9}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in result["runs"])
    assert len(result["summary"]) == len(METHODS) * 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["test_images"] == 24
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--shots", "1,x"], "Invalid shot 'x'"),
    (["--methods", "linear,magic"], "Invalid --methods"),
])
def test_cli_bad_options_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                  message: str) -> None:
    assert main(["transfer-curve", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *args]) != 0
    assert_one_error_line(capsys.readouterr().err, message)


def test_few_shot_runs_only_at_the_budgets_of_its_rule(tiny_data: Path, tmp_path: Path) -> None:
    cc = CurveConfig(data=str(tiny_data), model=TINY_MODEL, weights="none", shots=("2", "21"), seeds=1,
                     methods=("linear", "few-shot"), img_size=TINY_SIZE, probe_steps=5,
                     cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "curve"))
    result = transfer_curve(cc)
    assert sorted((r["method"], r["shots"]) for r in result["runs"]) == [
        ("few-shot", "2"), ("linear", "2"), ("linear", "21")]
    assert result["test_images"] == 24  # the whole test split by default
