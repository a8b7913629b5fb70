"""TensorRT: profile parsing, sidecar checks, missing-TensorRT errors, typing against tensorrt-stubs.

Everything that needs no TensorRT runs everywhere; engine builds are marked ``gpu`` and skipped,
with the reason, where TensorRT or a CUDA GPU is absent.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tl_deploy.errors import ArtifactError, BackendUnavailableError, DataError
from tl_deploy.export.__main__ import main
from tl_deploy.export.tensorrt import parse_batch_profile
from tl_deploy.formats.engine_sidecar import BatchProfile, check_sidecar, make_sidecar, read_sidecar, sidecar_path
from tl_deploy.formats.metadata import OnnxMetadata
from tl_deploy.preprocess import PreprocessSpec
from tl_deploy.runtime.gpu import require_tensorrt

ROOT = Path(__file__).resolve().parents[1]


def _trt_missing_reason() -> str | None:
    try:
        require_tensorrt()
    except BackendUnavailableError as exc:
        return f"TensorRT/CUDA not usable here: {exc}"
    return None


TRT_MISSING = _trt_missing_reason()
requires_trt = pytest.mark.skipif(TRT_MISSING is not None, reason=TRT_MISSING or "")

ENV = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
META = OnnxMetadata(class_names=("a", "b"), spec=PreprocessSpec(input_size=32, resize=32),
                    source_checksum="0" * 64, architecture="test_efficientnet")


def _sidecar(**changes: object) -> dict[str, object]:
    sidecar = make_sidecar(env=ENV, precision="int8", profile=BatchProfile(1, 8, 32), input_name="input",
                           input_shape=(-1, 3, 32, 32), workspace_bytes=1 << 30, strongly_typed=True,
                           onnx_file="model.int8.onnx", onnx_sha256="1" * 64, engine_sha256="2" * 64,
                           metadata=META, build_seconds=12.3)
    sidecar.update(changes)
    return sidecar


# --------------------------------------------------------------------------- profile parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("1:8:32", BatchProfile(1, 8, 32)), (" 2:2:4 ", BatchProfile(2, 2, 4)), ("8", BatchProfile(8, 8, 8)),
])
def test_parse_batch_profile(text: str, expected: BatchProfile) -> None:
    assert parse_batch_profile(text) == expected
    assert str(parse_batch_profile("1:8:32")) == "1:8:32"


@pytest.mark.parametrize("text", ["0:1:2", "8:4:32", "1:8:4", "a:b:c", "1:8", "1:8:32:64", "-1:2:3", "",
                                  "1:8:5000", "1.5:2:3"])
def test_parse_batch_profile_refuses(text: str) -> None:
    with pytest.raises(DataError, match="Invalid --batch"):
        parse_batch_profile(text)


# --------------------------------------------------------------------------- sidecar checks (pure)


def test_sidecar_round_trip_returns_metadata() -> None:
    sidecar = _sidecar()
    assert sidecar["profile"] == {"min": 1, "opt": 8, "max": 32, "input": "input", "shape": [-1, 3, 32, 32]}
    assert check_sidecar(sidecar, ENV, engine_sha256="2" * 64) == META


@pytest.mark.parametrize(("env_change", "words"), [
    ({"tensorrt": "10.3.0"}, "TensorRT 10.13.0.35 on NVIDIA H100"),
    ({"gpu": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}, "A100-SXM4-40GB"),
    ({"compute_capability": "8.9"}, "compute capability 8.9"),
])
def test_foreign_engine_is_refused_with_rebuild_hint(env_change: dict[str, str], words: str) -> None:
    with pytest.raises(ArtifactError, match="rebuild it on this machine") as info:
        check_sidecar(_sidecar(), {**ENV, **env_change}, engine_sha256="2" * 64, engine_name="m.engine")
    message = str(info.value)
    assert words in message and "python -m tl_deploy.export MODEL_DIR --trt" in message
    assert "\n" not in message


def test_tampered_engine_or_sidecar_is_refused() -> None:
    with pytest.raises(ArtifactError, match="does not match its sidecar"):
        check_sidecar(_sidecar(), ENV, engine_sha256="3" * 64)
    incomplete = _sidecar()
    del incomplete["gpu"]
    with pytest.raises(ArtifactError, match=r"incomplete \(missing \['gpu'\]\)"):
        check_sidecar(incomplete, ENV)
    with pytest.raises(ArtifactError, match="newer than this tl_deploy"):
        check_sidecar(_sidecar(format_version=99), ENV)
    with pytest.raises(ArtifactError, match="is not 'tl_deploy.trt_engine'"):
        check_sidecar(_sidecar(format="other"), ENV)
    with pytest.raises(ArtifactError, match="unknown precision 'int4'"):
        check_sidecar(_sidecar(precision="int4"), ENV)
    with pytest.raises(ArtifactError, match="Invalid tl_deploy metadata"):
        check_sidecar(_sidecar(metadata={"format": "tl_deploy.onnx"}), ENV)


def test_read_sidecar_errors(tmp_path: Path) -> None:
    engine = tmp_path / "model.int8.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ArtifactError, match="has no sidecar model.int8.engine.json"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{broken")
    with pytest.raises(ArtifactError, match="Corrupt engine sidecar"):
        read_sidecar(engine)


# --------------------------------------------------------------------------- without TensorRT


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here")
def test_require_tensorrt_names_what_is_missing() -> None:
    with pytest.raises(BackendUnavailableError) as info:
        require_tensorrt()
    message = str(info.value)
    # TensorRT 10 and 11 are on PyPI: the install text needs no extra index any more.
    assert "pip install 'tl_deploy[trt]'" in message and "pypi.nvidia.com" not in message or "CUDA" in message
    assert info.value.exit_code == 2


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here")
def test_cli_trt_without_tensorrt_exits_2_and_writes_nothing(tiny_artifact: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export" / "tiny"
    assert main([str(tiny_artifact), "--trt", "--int8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "TensorRT" in err or "CUDA" in err
    assert "tl_deploy[trt]" in err or "CUDA" in err
    assert not (tmp_path / "export").exists()  # not even the parent folder: it fails before any work


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here")
def test_cli_trt_error_in_a_fresh_process(tiny_artifact: Path, tmp_path: Path) -> None:
    """The real command line: one line on stderr, exit code 2, nothing written."""
    proc = subprocess.run([sys.executable, "-m", "tl_deploy.export", str(tiny_artifact), "--trt",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here")
def test_runtime_engine_without_tensorrt(tmp_path: Path) -> None:
    from tl_deploy.runtime import load

    engine = tmp_path / "model.fp32.engine"
    engine.write_bytes(b"x")
    with pytest.raises(BackendUnavailableError):
        load(engine)


# --------------------------------------------------------------------------- typing


def _patched_stubs(dest: Path) -> Path:
    """A copy of tensorrt-stubs that mypy can read.

    The installed stubs are not PEP 561 (``tensorrt/`` has no py.typed, so mypy skips them) and
    tensorrt_bindings/tensorrt.pyi has syntax errors: parameters named ``in`` (IPluginV3OneBuild /
    IPluginV3OneRuntime on_shape_change & co.) and a non-default parameter after defaults
    (INetworkDefinition.add_scale_nd). Fix exactly those, and nothing else.
    """
    site = Path(importlib.util.find_spec("tensorrt_bindings").submodule_search_locations[0]).parent  # type: ignore[union-attr,index]
    for name in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / name, dest / name)
    stub = dest / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"(\bdef \w+\([^)]*?)\bin: ", r"\1in_: ", stub.read_text())
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    stub.write_text(text)
    return dest


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_bindings") is None, reason="tensorrt-stubs not installed")
def test_mypy_against_tensorrt_stubs(tmp_path: Path) -> None:
    """The TensorRT code is type-checked against the real API (the stubs), not treated as Any."""
    stubs = _patched_stubs(tmp_path / "stubs")
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\nwarn_unused_ignores = False\n"
        f"mypy_path = {stubs}\ncache_dir = {ROOT / '.mypy_cache' / 'trt-stubs'}\n"
        "[mypy-tensorrt_bindings.*]\nignore_errors = True\n[mypy-tensorrt.*]\nignore_errors = True\n"
    )
    probe = tmp_path / "probe.py"  # proves the stubs are really used: this must fail
    probe.write_text("import tensorrt as trt\ntrt.Builder(trt.Logger()).create_netwrk(0)\n")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--follow-imports=silent"]
    bad = subprocess.run([*cmd, str(probe)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert 'has no attribute "create_netwrk"' in bad.stdout, bad.stdout[-2000:]
    good = subprocess.run([*cmd, "tl_deploy/export", "tl_deploy/runtime"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert good.returncode == 0, good.stdout[-3000:]


# --------------------------------------------------------------------------- with TensorRT (gpu)


@pytest.fixture(scope="module")
def trt_export(tiny_artifact: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tl_deploy.export import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("trt") / "tiny"
    export_artifact(tiny_artifact, out, ExportOptions(int8=True, trt=True, fp16=True, calib_data=tiny_data,
                                                      calib_samples=32, batch=BatchProfile(1, 4, 8)))
    return out


@pytest.mark.gpu
@requires_trt
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_engine_round_trip(trt_export: Path, precision: str, tiny_data: Path) -> None:
    from tl_deploy.runtime import load

    engine = load(trt_export / f"model.{precision}.engine")
    reference = load(trt_export / "model.onnx")
    assert engine.backend_name == "tensorrt" and engine.precision == precision
    paths = sorted((tiny_data / "test").rglob("*.png"))[:11]  # > profile max 8: chunked
    x = reference.preprocess(paths)
    agree = (engine.infer(x).argmax(1) == reference.infer(x).argmax(1)).mean()
    assert agree >= 0.8
    assert load(trt_export).backend_name == "tensorrt"  # auto prefers the engine when it can run


@pytest.mark.gpu
@requires_trt
def test_engine_with_foreign_sidecar_is_refused(trt_export: Path, tmp_path: Path) -> None:
    import json

    from tl_deploy.runtime import load

    engine = tmp_path / "model.int8.engine"
    shutil.copy(trt_export / engine.name, engine)
    sidecar = json.loads(sidecar_path(trt_export / engine.name).read_text())
    sidecar["tensorrt"] = "9.0.0"
    sidecar_path(engine).write_text(json.dumps(sidecar))
    with pytest.raises(ArtifactError, match="rebuild"):
        load(engine)

