"""The finetune verb's generated parser: one option per config field, help that states each default once,
earlier flag names, and options refused where they would do nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tl_deploy.data import load_model_splits
from tl_deploy.finetune import main
from tl_deploy.train.cli import config_from_args, get_args_parser
from tl_deploy.train.config import TrainConfig
from tl_deploy.train.optim import lr_factor

from .conftest import TINY_MODEL, make_image_folder


def parse(*argv: str) -> TrainConfig:
    return config_from_args(get_args_parser().parse_args(list(argv)))


def test_defaults_parse_to_the_default_config() -> None:
    assert parse() == TrainConfig()


def test_every_field_has_an_option_with_help() -> None:
    parser = get_args_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in by_dest, f.name
        assert by_dest[f.name].help, f.name
    for flag in ("--batch-size", "--seed", "--warmup-epochs"):  # had no help before
        assert any(flag in a.option_strings and a.help for a in parser._actions), flag


def test_help_states_each_default_once() -> None:
    parser = get_args_parser()
    text = parser.format_help()
    assert "(default: None)" not in text
    assert "(default: True)" not in text  # --no-channel-attention
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = (formatter._get_help_string(action) or "").replace("%(default)s", "X")
        assert shown.lower().count("default") <= 1, action.dest
    assert "--val-split" not in text and "--frozen-runtime" not in text  # earlier names: accepted, not shown
    for flag in ("-b", "--opt", "--wd", "--pretrained", "--augment", "--no-augment", "--threads",
                 "--val-fraction", "--cache-runtime"):
        assert flag in text, flag


def test_earlier_flag_names_still_work() -> None:
    cfg = parse("--val-split", "0.2", "--frozen-runtime", "torch", "--bn", "frozen")
    assert (cfg.val_fraction, cfg.cache_runtime, cfg.bn) == (0.2, "torch", "eval")
    assert TrainConfig(bn="frozen").bn == "eval"
    assert parse("--threads", "1", "-b", "8", "--wd", "0.5").threads == 1


def test_lr_factor_warms_up_then_decays_to_zero() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


REFUSED = [
    (["--strategy", "linear", "--unfreeze", "2"], "--unfreeze does nothing with --strategy linear"),
    (["--strategy", "linear", "--epochs", "3"], "--epochs does nothing with --strategy linear"),
    (["--strategy", "linear", "--lr", "0.1"], "--lr does nothing"),
    (["--strategy", "linear", "--backbone-lr-mult", "0.5"], "--backbone-lr-mult does nothing"),
    (["--strategy", "linear", "--layer-decay", "0.7"], "--layer-decay does nothing"),
    (["--strategy", "linear", "--warmup-epochs", "1"], "--warmup-epochs does nothing"),
    (["--strategy", "linear", "--bn", "train"], "--bn does nothing"),
    (["--strategy", "linear", "--augment"], "--augment does nothing"),
    (["--strategy", "linear", "--no-augment"], "--augment does nothing"),
    (["--strategy", "linear", "--grad-accum-steps", "2"], "--grad-accum-steps does nothing"),
    (["--strategy", "linear", "--patience", "2"], "--patience does nothing"),
    (["--strategy", "linear", "--amp", "off"], "--amp does nothing"),
    (["--strategy", "linear", "--epochs", "3", "--lr", "0.1"], "--epochs, --lr do nothing"),
    (["--strategy", "linear", "--drop-rate", "0.1"], "--drop-rate does nothing with --strategy linear and --head"),
    (["--strategy", "finetune", "--probe-epochs", "3"], "--probe-epochs does nothing with --strategy finetune"),
    (["--strategy", "partial", "--probe-lr", "0.1"], "--probe-lr does nothing with --strategy partial"),
    (["--fusion-levels", "2"], "--fusion-levels does nothing with --head linear"),
    (["--fusion-dim", "8"], "--fusion-dim does nothing with --head linear"),
    (["--no-channel-attention"], "--no-channel-attention does nothing with --head linear"),
    (["--da-weight", "0.5"], "--da-weight does nothing without --da"),
    (["--layer-decay", "0.7", "--backbone-lr-mult", "0.5"], "--backbone-lr-mult does nothing with --layer-decay"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED)
def test_options_that_do_nothing_are_refused(args: list[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["--strategy", "linear", "--probe-epochs", "5", "--probe-lr", "0.01", "--batch-size", "8"],
    ["--strategy", "linear", "--head", "attention-fusion", "--drop-rate", "0.1"],
    ["--strategy", "finetune", "--epochs", "3", "--unfreeze", "all", "--layer-decay", "0.7"],
    ["--strategy", "partial", "--unfreeze", "2", "--bn", "train", "--augment"],
    ["--head", "attention-fusion", "--fusion-levels", "2", "--fusion-dim", "8", "--no-channel-attention"],
    ["--da", "dann", "--target-unlabeled", "T", "--da-weight", "0.5"],
])
def test_options_that_apply_are_accepted(args: list[str]) -> None:
    parse(*args)


def test_model_without_embedded_weights_is_refused_before_the_data_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--data", str(tmp_path / "no-data"), "--model", "test_resnet", "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "No embedded weights for 'test_resnet'" in err and "efficientnet_lite0" in err
    assert "--weights hub" in err and "--weights PATH" in err and "--weights none" in err


@pytest.mark.parametrize("key", ["val_fraction", "val_split"])
def test_model_splits_read_the_recorded_val_fraction_under_either_name(key: str, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", {"train": 8, "test": 2})
    splits = load_model_splits(data, {key: 0.25, "seed": 3, "model": TINY_MODEL}, verify_images=False)
    assert len(splits.val) > 0 and len(splits.train) + len(splits.val) == 24
