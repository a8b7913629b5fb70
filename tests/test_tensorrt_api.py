"""The TensorRT code against the TensorRT 10 and 11 Python APIs, without TensorRT or a GPU.

``tests/data/tensorrt_api.json`` lists every module attribute and class member of NVIDIA's real
``tensorrt_cu12_bindings`` wheels (10.16 and 11.4), written by ``tools/tensorrt_api_names.py``. Two
checks read it: a static one (every ``trt.X.Y`` the code names, and no member TensorRT 11 removed),
and a run of the real engine build against a stand-in ``tensorrt`` module that has exactly the
members of one version, so a removed API fails with AttributeError as it would on that version.
"""

from __future__ import annotations

import ast
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tl_deploy.errors import BackendUnavailableError, TlDeployError
from tl_deploy.export import ExportOptions

ROOT = Path(__file__).resolve().parents[1]
API = json.loads((Path(__file__).parent / "data" / "tensorrt_api.json").read_text())["versions"]
TRT10, TRT11 = "10.16.1.11", "11.4.0.106"
NAMES = {version: set(entry["names"]) for version, entry in API.items()}


def _tensorrt_files() -> list[Path]:
    """Every source file that imports tensorrt (library, app, bench scripts)."""
    files = [*ROOT.glob("tl_deploy/**/*.py"), *ROOT.glob("app/**/*.py"), *ROOT.glob("bench/**/*.py")]
    return sorted(f for f in files if "import tensorrt" in f.read_text())


def _trt_uses(path: Path) -> tuple[set[str], set[str]]:
    """(``X`` / ``X.Y`` named through the tensorrt module, every other attribute name used)."""
    tree = ast.parse(path.read_text())
    aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name == "tensorrt"}
    chains: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        parts = [node.attr]
        base: ast.expr = node.value
        while isinstance(base, ast.Attribute):
            parts.insert(0, base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in aliases:
            chains.add(".".join(parts[:2]))
        else:
            others.add(node.attr)
    return chains, others


def test_the_name_lists_are_the_real_apis() -> None:
    """The committed lists hold what the migration guide says (else the checks below prove nothing)."""
    assert {"BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8EntropyCalibrator2", "ICudaEngine.device_memory_size",
            "BuilderFlag.OBEY_PRECISION_CONSTRAINTS"} <= NAMES[TRT10]
    assert not {"BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.BF16", "IInt8EntropyCalibrator2",
                "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
                "ICudaEngine.device_memory_size", "IBuilderConfig.int8_calibrator"} & NAMES[TRT11]
    assert {"Builder", "BuilderFlag.TF32", "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
            "IExecutionContext.execute_async_v3"} <= NAMES[TRT11]


def test_tensorrt_code_uses_only_what_tensorrt_11_kept() -> None:
    files = _tensorrt_files()
    assert {ROOT / "tl_deploy/export/tensorrt.py", ROOT / "tl_deploy/runtime/tensorrt_backend.py"} <= set(files)
    def members(version: str) -> set[str]:
        return {name.split(".", 1)[1] for name in NAMES[version] if "." in name}

    # Members that no TensorRT 11 class has any more (device_memory_size, int8_calibrator, ...): an
    # attribute of that name on any object is a removed call. "precision" is ILayer.precision (weak
    # typing, removed) but these files also read OnnxMetadata.precision and Runner.precision.
    removed_everywhere = members(TRT10) - members(TRT11) - {"precision"}
    problems = []
    for path in files:
        chains, others = _trt_uses(path)
        for version in (TRT10, TRT11):
            problems += [f"{path.relative_to(ROOT)}: trt.{c} is not in TensorRT {version}"
                         for c in sorted(chains - NAMES[version]) if not c.startswith("__")]
        problems += [f"{path.relative_to(ROOT)}: .{name} was removed in TensorRT 11"
                     for name in sorted(others & removed_everywhere)]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- a stand-in tensorrt


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []


# What the calls the build makes return (everything else returns None).
_RETURNS: dict[str, Any] = {
    "Builder.create_network": "INetworkDefinition", "Builder.create_builder_config": "IBuilderConfig",
    "Builder.create_optimization_profile": "IOptimizationProfile", "INetworkDefinition.get_input": "ITensor",
    "IBuilderConfig.create_timing_cache": "ITimingCache", "IBuilderConfig.get_timing_cache": "ITimingCache",
    "OnnxParser.parse_from_file": True, "IBuilderConfig.set_timing_cache": True,
    "Builder.build_serialized_network": b"serialized engine", "ITimingCache.serialize": b"timing cache",
}
_VALUES: dict[str, Any] = {"ITensor.name": "input", "OnnxParser.num_errors": 0}


def fake_tensorrt(version: str, recorder: _Recorder) -> types.ModuleType:
    """A ``tensorrt`` module with exactly the names of one real version; calls are recorded."""
    names = NAMES[version]
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]

    class Member:
        def __init__(self, qualname: str) -> None:
            self.qualname = qualname

        def __int__(self) -> int:  # enum members
            return sorted(n for n in names if n.startswith(self.qualname.split(".")[0] + ".")).index(self.qualname)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            recorder.calls.append((self.qualname, args))
            result = _RETURNS.get(self.qualname)
            return Instance(result) if isinstance(result, str) else result

    class Instance:
        def __init__(self, cls: str) -> None:
            self.cls = cls

        def __getattr__(self, attr: str) -> Any:
            qualname = f"{self.cls}.{attr}"
            if qualname not in names:
                raise AttributeError(f"TensorRT {version}: {self.cls} has no attribute {attr!r}")
            return _VALUES[qualname] if qualname in _VALUES else Member(qualname)

    class Class:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, attr: str) -> Any:
            qualname = f"{self.name}.{attr}"
            if qualname not in names:
                raise AttributeError(f"TensorRT {version}: {self.name} has no attribute {attr!r}")
            return Member(qualname)

        def __call__(self, *args: Any) -> Instance:
            recorder.calls.append((self.name, args))
            return Instance(self.name)

    for name in {n.split(".")[0] for n in names}:
        setattr(module, name, Class(name))
    return module


class FakeCudart:
    """cuda-python's runtime on a machine with two GPUs; records which device each call used."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return 0, 2

    def cudaSetDevice(self, device: int) -> tuple[int]:
        self.recorder.calls.append(("cudaSetDevice", (device,)))
        return (0,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:
        self.recorder.calls.append(("cudaGetDeviceProperties", (device,)))
        return 0, types.SimpleNamespace(name=f"Fake GPU {device}".encode(), major=9, minor=0)


@pytest.fixture(scope="module")
def onnx_files(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model.onnx and model.fp16.onnx of the tiny model (no INT8: its precision comes the same way)."""
    from tl_deploy.export import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("trt_api") / "tiny"
    export_artifact(tiny_artifact, out, ExportOptions(fp16=True))
    return {"fp32": out / "model.onnx", "fp16": out / "model.fp16.onnx"}


@pytest.mark.parametrize("version", [TRT10, TRT11])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_runs_on_both_apis(version: str, precision: str, onnx_files: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One build path: strongly typed, no precision flags, precision from the file, on the GPU asked for."""
    import tl_deploy.export.tensorrt as trt_export
    import tl_deploy.runtime.gpu as gpu

    recorder = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, recorder))
    monkeypatch.setattr(gpu, "import_cudart", lambda: FakeCudart(recorder))
    engine = tmp_path / f"model.{precision}.engine"
    result = trt_export.onnx_to_engine(onnx_files[precision], engine, timing_cache=tmp_path / "cache", device=1)

    assert engine.read_bytes() == b"serialized engine" and (tmp_path / "cache").read_bytes() == b"timing cache"
    assert result.sidecar["precision"] == precision and result.sidecar["strongly_typed"] is True
    assert result.sidecar["gpu"] == "Fake GPU 1" and result.sidecar["tensorrt"] == version
    calls = dict(recorder.calls)
    flag = calls["Builder.create_network"][0]
    assert flag == 1 << int(sys.modules["tensorrt"].NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert "IBuilderConfig.set_flag" not in calls  # precision is the file's, never a builder flag
    assert [c for c in recorder.calls if c[0].startswith("cuda")] and \
        all(args == (1,) for name, args in recorder.calls if name.startswith("cuda"))


def test_removed_flag_fails_on_the_tensorrt_11_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in really is TensorRT 11: the call the old FP16 build made fails there."""
    tensorrt = fake_tensorrt(TRT11, _Recorder())
    with pytest.raises(AttributeError, match="BuilderFlag has no attribute 'FP16'"):
        _ = tensorrt.BuilderFlag.FP16  # type: ignore[attr-defined]
    assert fake_tensorrt(TRT10, _Recorder()).BuilderFlag.FP16 is not None  # type: ignore[attr-defined]


def test_bad_device_index_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import tl_deploy.runtime.gpu as gpu

    monkeypatch.setattr(gpu, "import_cudart", lambda: FakeCudart(_Recorder()))
    with pytest.raises(BackendUnavailableError, match=r"Invalid CUDA device 2: this machine has 2 GPU\(s\)"):
        gpu.set_device(2)


@pytest.mark.parametrize(("device", "index"), [(None, 0), ("cuda", 0), ("cuda:1", 1)])
def test_engine_device_parsing(device: str | None, index: int) -> None:
    from tl_deploy.runtime.gpu import gpu_index

    assert gpu_index(device, gpu_only=True) == index


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "gpu:1"])
def test_engine_device_parsing_refuses(device: str) -> None:
    from tl_deploy.runtime.gpu import gpu_index

    with pytest.raises(TlDeployError, match="use cuda or cuda:N"):
        gpu_index(device, gpu_only=True)


# --------------------------------------------------------------------------- onnxruntime's TensorRT provider


@pytest.mark.parametrize(("ort", "trt", "ok"), [
    ("1.26.0", "11.4.0.106", False), ("1.27.0", "11.4.0.106", True), ("1.32.0", "11.0.0", True),
    ("1.22.0", "10.13.3.9", True), ("1.22.0", None, True), ("2.0.0", "11.4", True),
])
def test_ort_tensorrt_provider_versions(ort: str, trt: str | None, ok: bool) -> None:
    from tl_deploy.runtime.gpu import ort_tensorrt_problem

    problem = ort_tensorrt_problem(ort, trt)
    assert (problem is None) == ok
    if not ok:
        assert problem is not None and "onnxruntime >= 1.27 for TensorRT 11" in problem
        assert f"onnxruntime {ort} with TensorRT {trt}" in problem and "pip install" in problem


def test_ort_tensorrt_provider_refused_when_versions_clash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from tl_deploy.runtime import load

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.4.0.106"))
    monkeypatch.setattr(onnxruntime, "__version__", "1.26.1")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the versions are refused first")
    with pytest.raises(BackendUnavailableError, match=r"needs onnxruntime >= 1.27 for TensorRT 11"):
        load(model, providers=["TensorrtExecutionProvider", "CPUExecutionProvider"])


# --------------------------------------------------------------------------- the export-time engine check


@pytest.mark.parametrize("wrong", [None, "fp32", "fp16", "int8"])
def test_every_engine_build_is_checked_against_its_source(tiny_artifact: Path, tiny_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          wrong: str | None) -> None:
    """Engines come from the file of their precision; one whose logits are off is refused, nothing written."""
    import numpy as np

    import tl_deploy.export as export
    import tl_deploy.runtime.tensorrt_backend as backend
    from tl_deploy.errors import ExportError
    from tl_deploy.export.tensorrt import EngineResult
    from tl_deploy.formats.metadata import read_onnx_metadata
    from tl_deploy.runtime.base import Runner
    from tl_deploy.runtime.onnxruntime_backend import load_onnx

    sources: dict[str, str] = {}

    def fake_build(source: Path, engine: Path, **kwargs: Any) -> EngineResult:
        precision = read_onnx_metadata(str(source)).precision
        sources[precision] = source.name
        engine.write_text(str(source))  # the fake engine remembers its ONNX file
        assert kwargs["device"] == 1
        return EngineResult(path=engine, sidecar={"gpu": "Fake GPU", "precision": precision}, seconds=0.1)

    class FakeRunner(Runner):
        """Runs the engine's source ONNX on onnxruntime, like a correct engine; ``wrong`` adds an error."""

        def __init__(self, path: Path, *, device: int) -> None:
            self.path = path

        def _activate_impl(self) -> None:
            self.inner = load_onnx(Path(self.path.read_text()), optimize=False, threads=1)
            self.metadata, self.precision = self.inner.metadata, self.inner.precision

        def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
            logits = self.inner.infer(batch)
            if self.precision == wrong:  # #4813-style: plausible numbers, wrong ranking
                logits = logits[:, ::-1] + np.float32(3.0)
            return logits

        def _deactivate_impl(self) -> None:
            self.inner.close()

    monkeypatch.setattr(export, "require_tensorrt", lambda: None)
    monkeypatch.setattr(export, "set_device", lambda device: None)
    monkeypatch.setattr(export, "onnx_to_engine", fake_build)
    monkeypatch.setattr(backend, "TensorRTRunner", FakeRunner)
    out = tmp_path / "export" / "tiny"
    builds = [ExportOptions(fp16=True, int8=True, trt=True, calib_data=tiny_data, calib_samples=24, device=1),
              ExportOptions(trt=True, calib_data=tiny_data, device=1)]
    if wrong is None:
        rows = [row for options in builds for row in export.export_artifact(tiny_artifact, out / str(options.fp16),
                                                                             options)]
        engines = {row.precision: row for row in rows if row.kind == "engine"}
        assert sources == {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx", "fp32": "model.onnx"}
        assert set(engines) == {"int8", "fp16", "fp32"}
        assert all("held-out images" in row.check and row.extra["source"] == sources[p] for p, row in engines.items())
        return
    options = builds[1] if wrong == "fp32" else builds[0]
    with pytest.raises(ExportError, match=f"TensorRT {wrong.upper()} engine is wrong .*nothing was written"):
        export.export_artifact(tiny_artifact, out, options)
    assert not out.exists() and list((tmp_path / "export").iterdir()) == []
