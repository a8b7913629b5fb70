"""The ``tl-deploy`` command: the dispatcher, every verb's help, exit codes, earlier flag names and
refused no-op options (docs/cli.md)."""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tl_deploy import __version__
from tl_deploy.__main__ import VERBS, main, verb_main
from tl_deploy.cli import EXIT_CANNOT_RUN, EXIT_FAILED, EXIT_OK, new_parser, old_names, refuse_unused
from tl_deploy.errors import UsageError

OWN_VERBS = ("export", "parity", "bench", "evaluate", "app")  # parsers built with cli.new_parser here


def run(argv: list[str]) -> int:
    """The dispatcher's exit status, whether a verb returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:  # pragma: no cover - main() turns these into return values
        return int(exc.code or 0)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def verb_parser(name: str) -> argparse.ArgumentParser:
    """The parser a verb's options live on (the subcommand's for transfer-curve)."""
    verb = VERBS[name]
    module = importlib.import_module(verb.module)
    if not hasattr(module, "get_args_parser"):
        module = importlib.import_module(f"{verb.module}.__main__")
    parser: argparse.ArgumentParser = module.get_args_parser()
    for word in verb.prefix:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


# --------------------------------------------------------------------------- the dispatcher


def test_help_lists_every_verb_with_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for name, verb in VERBS.items():
        assert f"  {name}" in out and verb.summary in out
    assert "predict" not in out or "predict" in VERBS
    assert {"finetune", "export", "parity", "bench", "evaluate", "app", "datasets", "transfer-curve"} <= set(VERBS)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"tl-deploy {__version__}"


def test_no_verb_prints_the_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run([]) == EXIT_CANNOT_RUN
    assert "usage: tl-deploy VERB" in capsys.readouterr().err


def test_unknown_verb_is_one_line_naming_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["train"]) == EXIT_CANNOT_RUN
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown verb 'train'")
    assert all(name in err for name in VERBS)


def test_every_verb_resolves_to_a_main() -> None:
    for name, verb in VERBS.items():
        assert callable(verb_main(verb)), name


def test_help_does_not_import_the_verbs() -> None:
    code = ("import sys; from tl_deploy.__main__ import main; main(['--help']); "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'streamlit', 'tl_deploy.finetune') "
            "if m in sys.modules]; "
            "sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_verb_through_python_m_tl_deploy(tiny_artifact: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tl_deploy", "export", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tl-deploy export"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tl_deploy", "export", str(tiny_artifact), "--workspace-gb", "4",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_CANNOT_RUN, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --workspace-gb does nothing without --trt")
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_is_declared() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["tl-deploy"] == "tl_deploy.__main__:main"


# --------------------------------------------------------------------------- help of every verb


@pytest.mark.parametrize("name", sorted(VERBS))
def test_help_states_each_default_once(name: str) -> None:
    parser = verb_parser(name)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{name} {flag} has no help"
        text = formatter._expand_help(action)
        assert text.lower().count("default") <= 1, f"{name} {flag}: {text}"
        assert "(default: None)" not in text, f"{name} {flag}: {text}"
        if any(option.startswith("--no-") for option in action.option_strings):
            assert "(default: True)" not in text and "(default: False)" not in text, f"{name} {flag}: {text}"
    assert parser.format_help()


@pytest.mark.parametrize("name", OWN_VERBS)
def test_own_verbs_are_named_tl_deploy_verb_and_take_v(name: str) -> None:
    parser = verb_parser(name)
    assert parser.prog == f"tl-deploy {name}"
    assert parser.parse_args([*(["model"] if name != "app" else []), "-v"]).verbose


@pytest.mark.parametrize("name", sorted(VERBS))
def test_unknown_flag_is_a_usage_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([name, "--no-such-flag"]) == EXIT_CANNOT_RUN
    assert len(error_lines(capsys.readouterr().err)) == 1


def test_help_shows_a_zero_default() -> None:
    help_text = verb_parser("export").format_help()
    assert "(default: 0)" in " ".join(help_text.split())  # --seed and --device: 0 is a value, not "unset"


# --------------------------------------------------------------------------- exit codes per verb


@pytest.mark.parametrize("argv, code, message", [
    (["export", "{missing}"], EXIT_FAILED, "Model artifact folder not found"),
    (["export", "{model}", "--calib-samples", "10"], EXIT_CANNOT_RUN, "--calib-samples does nothing without --int8"),
    (["export", "{model}", "--no-int8-cpu"], EXIT_CANNOT_RUN, "--no-int8-cpu does nothing without --int8"),
    (["export", "{model}", "--calib-data", "{data}"], EXIT_CANNOT_RUN,
     "--calib-data does nothing without --int8, --fp16 or --trt"),
    (["export", "{model}", "--trt-profile", "1:8:32", "--device", "1"], EXIT_CANNOT_RUN,
     "--trt-profile, --device do nothing without --trt"),
    (["export", "{model}", "--exporter", "dynamo", "--opset", "17"], EXIT_CANNOT_RUN, "pass --opset 18"),
    (["export", "{model}", "--trt", "--trt-profile", "8:4:2"], EXIT_CANNOT_RUN, "Invalid --trt-profile '8:4:2'"),
    (["parity", "{model}", "--export", "{missing}"], EXIT_FAILED, "Export folder not found"),
    (["parity", "{model}", "--backends", "onnx-fp64"], EXIT_CANNOT_RUN, "Invalid backend 'onnx-fp64'"),
    (["parity", "{model}", "--atol", "int8=lots"], EXIT_CANNOT_RUN, "Invalid --atol 'int8=lots'"),
    (["parity", "{model}", "--val-fraction", "0.2"], EXIT_CANNOT_RUN, "--val-fraction does nothing with --split test"),
    (["parity", "{model}", "--backends", "trt-fp32", "--threads", "2"], EXIT_CANNOT_RUN,
     "--threads does nothing without an onnx-* backend"),
    (["bench", "{model}", "--limit", "0", "--data", "{data}"], EXIT_CANNOT_RUN, "--data does nothing with --limit 0"),
    (["bench", "{model}", "--batch", "1,x"], EXIT_CANNOT_RUN, "Invalid --batch '1,x'"),
    (["bench", "{model}", "--backends", "tensorflow"], EXIT_CANNOT_RUN, "Invalid backend 'tensorflow'"),
    (["bench", "{model}", "--export", "{missing}"], EXIT_FAILED, "Export folder not found"),
    (["evaluate", "{missing}"], EXIT_FAILED, "{missing}"),
    (["evaluate", "{model}", "--val-fraction", "0.2"], EXIT_CANNOT_RUN, "--val-fraction does nothing"),
    (["evaluate", "{model}", "--limit", "0"], EXIT_CANNOT_RUN, "--limit: 0 is out of range"),
    (["app", "--port", "0"], EXIT_CANNOT_RUN, "--port: 0 is out of range"),
    (["app", "--model", "{missing}"], EXIT_FAILED, "Model not found"),
])
def test_typical_errors_are_one_line_with_the_documented_code(
        argv: list[str], code: int, message: str, tiny_artifact: Path, tiny_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    values = {"model": tiny_artifact, "data": tiny_data, "missing": tmp_path / "nope"}
    args = [a.format(**values) for a in argv]
    if args[0] == "export":
        args += ["--out", str(tmp_path / "out")]
    elif args[0] in ("parity", "bench", "evaluate"):
        args += ["--report", str(tmp_path / "report")]
    assert run(args) == code
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and message.format(**values) in error_lines(err)[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_parity_check_exits_1(tiny_artifact: Path, export_dir: Path, tiny_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    stem = tmp_path / "parity"
    code = run(["parity", str(tiny_artifact), "--export", str(export_dir), "--data", str(tiny_data), "--backends",
                "onnx-fp32", "--atol", "fp32=0", "--limit", "4", "--device", "cpu", "--report", str(stem)])
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED and "FAILED | parity of 1 backend(s)" in out, err
    assert (tmp_path / "parity.json").is_file()


def test_a_bare_atol_with_reduced_precisions_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from tl_deploy import parity

    args = parity.get_args_parser().parse_args(["model", "--atol", "1e-3"])
    with caplog.at_level(logging.WARNING):
        parity.refuse_no_ops(args, ["onnx-fp32", "onnx-int8"])
    assert "write --atol fp32=1e-3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parity.refuse_no_ops(args, ["onnx-fp32"])
    assert caplog.text == ""


def test_parity_device_defaults_to_auto() -> None:
    from tl_deploy import parity
    from tl_deploy.cli import resolve_device

    assert parity.get_args_parser().parse_args(["model"]).device == "auto"
    assert resolve_device("auto") in ("cpu", "cuda") and resolve_device("cuda:1") == "cuda:1"


# --------------------------------------------------------------------------- export's opset


def test_opset_follows_the_exporter() -> None:
    from tl_deploy.export.__main__ import get_args_parser, resolve_opset
    from tl_deploy.export.onnx import default_opset

    parser = get_args_parser()
    assert resolve_opset(parser.parse_args(["m"])) == 17 == default_opset("torchscript")
    assert resolve_opset(parser.parse_args(["m", "--exporter", "dynamo"])) == 18 == default_opset("dynamo")
    assert resolve_opset(parser.parse_args(["m", "--exporter", "dynamo", "--opset", "19"])) == 19
    assert resolve_opset(parser.parse_args(["m", "--opset", "13"])) == 13
    with pytest.raises(UsageError, match="pass --opset 18, drop --opset, or use --exporter torchscript"):
        resolve_opset(parser.parse_args(["m", "--exporter", "dynamo", "--opset", "17"]))


# --------------------------------------------------------------------------- earlier flag names


@pytest.mark.parametrize("verb, old, new, value, dest, parsed", [
    ("export", "--batch", "--trt-profile", "2:4:8", "trt_profile", "2:4:8"),
    ("bench", "--out", "--report", "r/bench", "report", Path("r/bench")),
    ("bench", "--e2e-images", "--limit", "5", "e2e_images", 5),
    ("bench", "--val-split", "--val-fraction", "0.2", "val_fraction", 0.2),
    ("parity", "--val-split", "--val-fraction", "0.2", "val_fraction", 0.2),
    ("evaluate", "--json", "--report", "e.json", "report", Path("e.json")),
    ("evaluate", "--val-split", "--val-fraction", "0.2", "val_fraction", 0.2),
])
def test_earlier_names_still_work_with_a_warning(verb: str, old: str, new: str, value: str, dest: str,
                                                 parsed: object, caplog: pytest.LogCaptureFixture) -> None:
    parser = verb_parser(verb)
    with caplog.at_level(logging.WARNING):
        args = parser.parse_args(["model", old, value])
    assert getattr(args, dest) == parsed == getattr(parser.parse_args(["model", new, value]), dest)
    assert f"{old} is now called {new}" in caplog.text
    help_text = parser.format_help()
    assert new in help_text and f"{old} " not in help_text.replace(f"{old}-", "")  # hidden from --help


def test_bench_with_its_earlier_out_and_e2e_names_runs(tiny_artifact: Path, export_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    stem = tmp_path / "reports" / "bench"
    code = run(["bench", str(tiny_artifact), "--export", str(export_dir), "--backends", "onnx-fp32", "--batch", "1",
                "--rounds", "1", "--seconds", "0.005", "--warmup", "0", "--e2e-images", "0", "--threads", "1",
                "--out", str(stem)])
    assert code == EXIT_OK, capsys.readouterr().err
    assert (stem.parent / "bench.json").is_file() and (stem.parent / "bench.png").is_file()


def test_evaluate_with_its_earlier_json_name_checks_that_path(tiny_artifact: Path, tiny_data: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    target = tiny_artifact / "report.json"
    assert run(["evaluate", str(tiny_artifact), "--data", str(tiny_data), "--json", str(target)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "--json is now called --report" in err
    assert len(error_lines(err)) == 1 and "inside the model artifact" in err and not target.exists()


def test_a_refused_option_is_named_as_typed() -> None:
    parser = new_parser("demo", "demo")
    old_names(parser.add_argument("--limit", "--e2e-images", dest="e2e_images", type=int, default=3), "--e2e-images")
    args = parser.parse_args(["--e2e-images", "4"])
    with pytest.raises(UsageError, match=r"^--e2e-images does nothing here\.$"):
        refuse_unused(args, ["e2e_images"], "here")
    refuse_unused(parser.parse_args([]), ["e2e_images"], "here")  # a default is never refused
