"""Fuzzing (hypothesis): every input to the image path and to the file loaders either works or raises
a ``TlDeployError`` with a message, never another exception.

Derandomized so CI is reproducible; ``TL_DEPLOY_FUZZ_EXAMPLES=N`` runs N examples per test instead of
the default (a longer hunt).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tl_deploy.artifact import load_artifact
from tl_deploy.cli import Range
from tl_deploy.errors import TlDeployError
from tl_deploy.formats.engine_sidecar import check_sidecar
from tl_deploy.formats.metadata import OnnxMetadata
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.train.checkpoint import Checkpointer

EXAMPLES = int(os.environ.get("TL_DEPLOY_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def outcome(call: Callable[[], Any]) -> str:
    """Run ``call``; 'ok' or 'refused' (TlDeployError with a message). Anything else fails the test."""
    try:
        call()
    except TlDeployError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return "refused"
    return "ok"


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def clf(tiny_artifact: Path):  # type: ignore[no-untyped-def]
    from tl_deploy.runtime import load

    return load(tiny_artifact)


def _check_prediction(clf, source: Any) -> None:  # type: ignore[no-untyped-def]
    n = len(source) if isinstance(source, np.ndarray) and source.ndim == 4 else 1  # (N, H, W, C) is a batch
    labels, probs = clf.predict(source, top_k=2)
    assert len(labels) == n and probs.shape == (n, 2) and np.all(np.isfinite(probs))


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A real image file of random mode, size and format, then possibly truncated or bit-flipped."""
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "F"]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    img = Image.new(mode, (w, h))
    img.putdata(list(np.random.default_rng(draw(st.integers(0, 999))).integers(0, 256, w * h).tolist()))
    buf = io.BytesIO()
    try:
        img.save(buf, format=draw(st.sampled_from(FORMATS)))
    except (OSError, ValueError, KeyError):
        img.convert("RGB").save(buf, format="PNG")  # this format cannot hold this mode
    data = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(clf, data: bytes) -> None:  # type: ignore[no-untyped-def]
    outcome(lambda: _check_prediction(clf, data))


@FUZZ
@given(data=encoded_images())
def test_damaged_image_files(clf, data: bytes) -> None:  # type: ignore[no-untyped-def]
    outcome(lambda: _check_prediction(clf, data))


@FUZZ
@given(mode=st.sampled_from(MODES), w=st.integers(0, 70), h=st.integers(0, 70), seed=st.integers(0, 99))
def test_random_pil_modes_and_sizes(clf, mode: str, w: int, h: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    img = Image.new(mode, (w, h))
    if w and h:
        img = Image.frombytes(mode, (w, h), np.random.default_rng(seed).bytes(len(img.tobytes())))
    outcome(lambda: _check_prediction(clf, img))


@FUZZ
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=4),
       dtype=st.sampled_from(["uint8", "float32", "int64", "bool", "uint16"]))
def test_random_arrays(clf, shape: list[int], dtype: str) -> None:  # type: ignore[no-untyped-def]
    arr = np.zeros(shape, dtype=dtype)
    outcome(lambda: _check_prediction(clf, arr))


# --------------------------------------------------------------------------- artifact and metadata loaders


@pytest.fixture(scope="module")
def scratch(tiny_artifact: Path) -> Iterator[tuple[Path, Path]]:
    """A pristine copy of the artifact and a work folder overwritten by each example."""
    with tempfile.TemporaryDirectory(prefix="tl_deploy_fuzz_") as tmp:
        yield tiny_artifact, Path(tmp) / "model"


def _fresh(scratch: tuple[Path, Path]) -> Path:
    src, work = scratch
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    return work


def _set_path(obj: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    if isinstance(obj, dict) and path[0] in obj:
        obj[path[0]] = _set_path(obj[path[0]], path[1:], value)
    return obj


CONFIG_PATHS = [["format"], ["format_version"], ["architecture"], ["architecture", "name"],
                ["architecture", "num_classes"], ["architecture", "head"], ["architecture", "drop_rate"],
                ["class_names"], ["preprocess"], ["preprocess", "input_size"], ["preprocess", "resize"],
                ["preprocess", "mean"], ["preprocess", "interpolation"], ["preprocess", "background"],
                ["preprocess", "channel_order"], ["training"], ["metrics"]]


@FUZZ
@given(where=st.sampled_from(CONFIG_PATHS), value=json_values, verify=st.booleans())
def test_config_fields_replaced_by_random_json(scratch, where: list[str], value: Any,  # type: ignore[no-untyped-def]
                                               verify: bool) -> None:
    work = _fresh(scratch)
    config = json.loads((work / "config.json").read_text())
    (work / "config.json").write_text(json.dumps(_set_path(config, where, value)))
    outcome(lambda: load_artifact(work, verify=verify))


@FUZZ
@given(name=st.sampled_from(["config.json", "manifest.json", "model.safetensors", "metrics.json"]),
       cut=st.floats(0.0, 1.0), garbage=st.binary(max_size=64), verify=st.booleans())
def test_truncated_or_garbled_artifact_files(scratch, name: str, cut: float, garbage: bytes,  # type: ignore[no-untyped-def]
                                             verify: bool) -> None:
    work = _fresh(scratch)
    data = (work / name).read_bytes()
    (work / name).write_bytes(data[: int(len(data) * cut)] + garbage)
    outcome(lambda: load_artifact(work, verify=verify))


@FUZZ
@given(doc=json_values)
def test_random_json_documents(scratch, doc: Any) -> None:  # type: ignore[no-untyped-def]
    from tl_deploy.runtime import load

    work = _fresh(scratch)
    text = json.dumps(doc)
    (work / "manifest.json").write_text(text)
    outcome(lambda: load_artifact(work))
    (work / "config.json").write_text(text)
    outcome(lambda: load_artifact(work, verify=False))
    export = work.parent / "export"
    export.mkdir(exist_ok=True)
    (export / "export.json").write_text(text)
    outcome(lambda: load(export))
    ckpt = Checkpointer(work.parent / "run", {"config": {}})
    ckpt.dir.mkdir(exist_ok=True)
    ckpt.meta_file.write_text(text)
    outcome(ckpt.load)
    if isinstance(doc, dict):
        outcome(lambda: PreprocessSpec.from_dict(doc))
        outcome(lambda: OnnxMetadata.from_dict(doc))
        outcome(lambda: check_sidecar(doc, {"tensorrt": "10.0", "gpu": "X", "compute_capability": "9.0"}))


@pytest.fixture(scope="module")
def real_props(tiny_artifact: Path) -> dict[str, str]:
    return load_artifact(tiny_artifact).onnx_metadata().to_props()


@FUZZ
@given(key=st.sampled_from(["tl_deploy.class_names", "tl_deploy.preprocess", "tl_deploy.input_layout",
                            "tl_deploy.precision", "tl_deploy.format", "tl_deploy.format_version",
                            "tl_deploy.quantization", "other"]),
       value=st.one_of(st.text(max_size=30), json_values.map(json.dumps)))
def test_onnx_metadata_props(real_props: dict[str, str], key: str, value: str) -> None:
    props = {**real_props, key: value}
    outcome(lambda: OnnxMetadata.from_props(props))
    outcome(lambda: OnnxMetadata.from_props({k: v for k, v in props.items() if k != key}))


# --------------------------------------------------------------------------- CLI arguments

CLI_MODULES = {"finetune": "tl_deploy.finetune", "evaluate": "tl_deploy.evaluate", "parity": "tl_deploy.parity",
               "bench": "tl_deploy.bench", "export": "tl_deploy.export.__main__", "datasets": "tl_deploy.datasets",
               "experiments": "tl_deploy.experiments"}
CLI_FUZZ = settings(FUZZ, max_examples=min(EXAMPLES, 30))


@functools.cache
def _cli(verb: str) -> tuple[Callable[[list[str]], int], argparse.ArgumentParser]:
    """A verb's main() and the parser its options live on (the subcommand's for experiments)."""
    module = importlib.import_module(CLI_MODULES[verb])
    parser = module.get_args_parser()
    if verb == "experiments":
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices["transfer-curve"]
    return module.main, parser


def _base_args(verb: str, scratch: Path) -> list[str]:
    """Arguments valid apart from the one under test, all pointing into ``scratch``."""
    model, out = str(scratch / "model"), str(scratch / "new")
    return {"finetune": ["--data", str(scratch / "data"), "--out", out], "evaluate": [model, "--report", out],
            "parity": [model, "--report", out], "bench": [model, "--report", out], "export": [model, "--out", out],
            "datasets": ["animal-shape", "--out", out], "experiments": ["transfer-curve", "--out", out]}[verb]


def _outside(allowed: Range) -> st.SearchStrategy[str]:
    """Text of values ``allowed`` refuses: non-numbers, non-finite, below or above its bounds, fractions for ints."""
    choices: list[st.SearchStrategy[str]] = [st.sampled_from(["nan", "inf", "-inf", "", "x", "1e999", "0x10", "1,5"])]
    if allowed.kind is int:
        choices.append(st.floats(-1e6, 1e6).filter(lambda v: v != int(v)).map(repr))
    if allowed.low is not None:
        if allowed.kind is int:
            top = int(allowed.low) - (0 if allowed.low_open else 1)
            choices.append(st.integers(-2**70, top).map(str))
        else:
            choices.append(st.floats(-1e30, allowed.low, exclude_max=not allowed.low_open).map(repr))
    if allowed.high is not None:
        if allowed.kind is int:
            bottom = int(allowed.high) + (0 if allowed.high_open else 1)
            choices.append(st.integers(bottom, 2**70).map(str))
        else:
            choices.append(st.floats(allowed.high, 1e30, exclude_min=not allowed.high_open).map(repr))
    return st.one_of(choices)


@st.composite
def bad_cli_arguments(draw: st.DrawFn) -> tuple[str, str, str]:
    """(verb, option, value) where the value is outside the option's allowed values."""
    verb = draw(st.sampled_from(sorted(CLI_MODULES)))
    _, parser = _cli(verb)
    numeric = [(a.option_strings[0], a.type) for a in parser._actions if isinstance(a.type, Range)]
    chosen = [(a.option_strings[0], a.choices) for a in parser._actions if a.option_strings and a.choices]
    kind = draw(st.sampled_from(["numeric"] * 3 + ["choice", "device", "unknown"]))
    if kind == "numeric" and numeric:
        flag, allowed = draw(st.sampled_from(numeric))
        return verb, flag, draw(_outside(allowed))
    if kind == "choice" and chosen:
        flag, values = draw(st.sampled_from(chosen))
        return verb, flag, draw(st.text(st.characters(codec="ascii", exclude_characters="-"), min_size=1,
                                        max_size=8).filter(lambda v: v not in values))
    devices = [a.option_strings[0] for a in parser._actions if "--device" in a.option_strings]
    if kind == "device" and devices:
        return verb, devices[0], draw(st.sampled_from(["bogus", "gpu", "cuda:", "cuda:x", "tpu", "CPU", ""]))
    return verb, "--no-such-option", "1"


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def cli_scratch(tiny_artifact: Path, tiny_data: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tl_deploy_cli_fuzz_") as tmp:
        shutil.copytree(tiny_artifact, Path(tmp) / "model")
        shutil.copytree(tiny_data, Path(tmp) / "data")
        yield Path(tmp)


def _run_cli(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def _assert_refused(code: int, err: str, mentions: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0, err
    assert len(errors) == 1 and mentions in errors[0], err
    assert "Traceback" not in err


@CLI_FUZZ
@given(case=bad_cli_arguments())
def test_cli_refuses_bad_arguments_in_one_line(cli_scratch: Path, case: tuple[str, str, str]) -> None:
    verb, flag, value = case
    main, _ = _cli(verb)
    before = _tree(cli_scratch)
    code, err = _run_cli(main, [*_base_args(verb, cli_scratch), f"{flag}={value}"])
    _assert_refused(code, err, flag)
    assert _tree(cli_scratch) == before  # nothing written, nothing removed


FOLDER_TARGETS = ["model/config.json", "model/sub", ".", "data", "data/train", "notes.txt", "notes.txt/out",
                  "stranger"]
HOSTILE_OUTPUTS = [  # (verb, --out/--report value) that each verb must refuse
    *((verb, target) for verb in ("finetune", "export", "datasets") for target in FOLDER_TARGETS),
    ("export", "model"), ("datasets", "model"),
    *(("evaluate", target) for target in ("model", "model/config.json", "model/report.json", "model/model.safetensors",
                                          ".", "data", "data/train/eval.json", "notes.txt/eval.json", "stranger")),
    *((verb, stem) for verb in ("parity", "bench") for stem in ("model/export", "model/config", "notes.txt/out",
                                                                 "data/report", "model/sub/report")),
]


@pytest.mark.parametrize("verb, target", HOSTILE_OUTPUTS)
def test_cli_refuses_hostile_output_paths(cli_scratch: Path, verb: str, target: str) -> None:
    (cli_scratch / "notes.txt").write_text("keep me")
    (cli_scratch / "stranger").mkdir(exist_ok=True)
    (cli_scratch / "stranger" / "thesis.txt").write_text("three years")
    main, _ = _cli(verb)
    flag = {"evaluate": "--report", "parity": "--report", "bench": "--report"}.get(verb, "--out")
    data = ["--data", str(cli_scratch / "data")]
    argv = {"finetune": [*data, "--model", "test_efficientnet", "--weights", "none"], "datasets": ["animal-shape"],
            "export": [str(cli_scratch / "model"), "--int8", "--calib-data", str(cli_scratch / "data")],
            }.get(verb, [str(cli_scratch / "model"), *data])
    before = _tree(cli_scratch)
    code, err = _run_cli(main, [*argv, flag, str(cli_scratch / target)])
    _assert_refused(code, err, flag)
    assert _tree(cli_scratch) == before
