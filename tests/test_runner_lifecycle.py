"""Runners with one lifecycle: settings in __init__, resources in activate, checks and timing in the base
class's infer, release in deactivate; parity as run, then compare."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from tl_deploy.errors import ArtifactError, BackendUnavailableError, DataError, TlDeployError
from tl_deploy.runtime.base import InputSpec, Runner, batch_problem
from tl_deploy.runtime.onnxruntime_backend import OnnxRuntimeRunner, load_onnx


class Doubler(Runner):
    """Doubles a (N, 2) float32 batch; counts what it acquired and released."""

    backend_name = "doubler"
    max_batch = 4

    def __init__(self) -> None:
        self.acquired = self.released = 0

    def _activate_impl(self) -> None:
        self.acquired += 1

    def input_spec(self) -> InputSpec | None:
        return InputSpec("x", np.dtype(np.float32), (None, 2))

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return batch * 2

    def _deactivate_impl(self) -> None:
        self.released += 1


def test_infer_needs_an_active_runner_and_a_with_block_releases_it() -> None:
    runner = Doubler()
    assert runner.acquired == 0 and runner.last_inference_time() is None  # __init__ acquires nothing
    with pytest.raises(TlDeployError, match="is not active: call activate"):
        runner.infer(np.ones((1, 2), np.float32))
    with runner:
        runner.activate()  # a second activate does nothing
        assert runner.is_active and runner.acquired == 1
        np.testing.assert_array_equal(runner.infer(np.ones((3, 2), np.float32)), np.full((3, 2), 2.0))
        assert (runner.last_inference_time() or -1.0) >= 0.0
    assert not runner.is_active and runner.released == 1
    runner.close()  # closing twice is harmless
    assert runner.released == 1


@pytest.mark.parametrize(("batch", "message"), [
    (np.ones((2, 2), np.float64), "dtype float64, but input 'x' float32"),
    (np.ones((2, 2, 1), np.float32), "has 3 dimensions"),
    (np.ones((2, 3), np.float32), "has 3 on axis 1"),
    (np.ones((5, 2), np.float32), "batch 5 is over the runner's maximum 4"),
    (np.ones((0, 2), np.float32), "an empty batch"),
    ([[1.0, 2.0]], "a numpy array is needed"),
])
def test_the_base_class_checks_every_batch(batch: object, message: str) -> None:
    with Doubler() as runner, pytest.raises(DataError, match=message):
        runner.infer(batch)  # type: ignore[arg-type]


def test_batch_problem_without_a_spec_checks_only_the_batch_axis() -> None:
    assert batch_problem(np.ones((3, 7)), None) is None
    assert batch_problem(np.ones((3, 7)), None, max_batch=2) is not None


def test_a_runner_dropped_while_active_warns_and_releases() -> None:
    runner = Doubler()
    runner.activate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.__del__()
    assert [w.category for w in caught] == [ResourceWarning] and "never deactivated" in str(caught[0].message)
    assert runner.released == 1 and not runner.is_active
    del runner
    gc.collect()


def _plain_graph(path: Path | None = None) -> bytes:
    """A graph with no tl_deploy metadata: (N, 5, 4) float32 -> its mean over the last axis, (N, 5)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2], keepdims=0)
    graph = helper.make_graph([node], "prefix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if path is not None:
        onnx.save(model, str(path))
    return model.SerializeToString()


def test_onnxruntime_runner_runs_a_plain_graph_from_memory_or_a_file(tmp_path: Path) -> None:
    x = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    with OnnxRuntimeRunner(_plain_graph(), providers=["CPUExecutionProvider"], threads=1, spin=False) as runner:
        np.testing.assert_allclose(runner.infer(x), x.mean(axis=2), rtol=1e-6)
        assert runner.input_spec() == InputSpec("x", np.dtype(np.float32), (None, 5, 4))
        with pytest.raises(DataError, match="has 3 on axis 1"):
            runner.infer(np.ones((2, 3, 4), np.float32))
    assert runner.session is None  # released
    path = tmp_path / "prefix.onnx"
    _plain_graph(path)
    with OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]) as runner:
        assert runner.infer(x).shape == (2, 5)
    # The metadata check is the loader's: a tl_deploy classifier needs its metadata.
    with pytest.raises(ArtifactError, match="has no tl_deploy metadata"):
        load_onnx(path)


def test_onnxruntime_runner_acquires_nothing_until_activated(tmp_path: Path) -> None:
    runner = OnnxRuntimeRunner(tmp_path / "missing.onnx")  # settings only: the file is looked at in activate
    assert runner.session is None and not runner.is_active
    with pytest.raises(ArtifactError, match="ONNX file not found"):
        runner.activate()
    assert not runner.is_active
    with pytest.raises(BackendUnavailableError, match="Invalid threads=0"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx", threads=0)


def test_classifier_activates_its_runner_and_close_releases_it(export_dir: Path) -> None:
    clf = load_onnx(export_dir / "model.onnx")
    assert clf.runner.is_active and clf.precision == "fp32"
    with clf:
        pass
    assert not clf.runner.is_active


def test_torch_reference_computes_in_true_fp32() -> None:
    torch = pytest.importorskip("torch")
    from tl_deploy.runtime.torch_backend import strict_fp32

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with strict_fp32(torch):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------- parity: run, then compare


def test_parity_runs_then_compares(export_dir: Path, tiny_data: Path) -> None:
    from tl_deploy.comparison import DEFAULT_TOLERANCES, Reference, compare
    from tl_deploy.parity import Batches, Candidate, run
    from tl_deploy.runtime.catalog import BackendChoice

    batches = Batches(sorted((tiny_data / "test").rglob("*.png"))[:6])
    reference_clf = load_onnx(export_dir / "model.onnx")
    with reference_clf:
        logits = reference_clf.infer(batches.for_spec(reference_clf.spec))
    labels = logits.argmax(1)
    reference = Reference(logits, labels, [str(p) for p in batches.paths], reference_clf.metadata, {})

    def unavailable() -> object:
        raise BackendUnavailableError("no GPU here")

    def broken() -> object:
        raise ArtifactError("model.int8.onnx was modified")

    candidates = [
        Candidate(BackendChoice("onnx-fp32", "fp32", "model.onnx"), lambda: load_onnx(export_dir / "model.onnx")),
        Candidate(BackendChoice("trt-fp32", "fp32", "model.fp32.engine"), unavailable),  # type: ignore[arg-type]
        Candidate(BackendChoice("onnx-int8", "int8", "model.int8.cpu.onnx"), broken),  # type: ignore[arg-type]
        Candidate(BackendChoice("onnx-fp16", "fp16", skip_reason="not in the export folder"), broken),  # type: ignore[arg-type]
    ]
    runs = run(candidates, batches)  # step 1: logits, nothing judged
    assert [r.status for r in runs] == ["ran", "skipped", "failed", "skipped"]
    assert runs[0].logits is not None and runs[0].logits.shape == logits.shape
    results = compare(runs, DEFAULT_TOLERANCES, reference=reference)  # step 2: the verdicts
    assert [r.status for r in results] == ["passed", "skipped", "failed", "skipped"]
    assert results[0].metrics["max_abs_logit_diff"] <= 1e-6 and results[0].line().startswith("PASSED | onnx-fp32")
    assert "no GPU here" in results[1].line() and "was modified" in results[2].line()
    runs[0].logits = runs[0].logits[:, ::-1].copy()  # the same run, judged again: now it disagrees
    assert compare(runs[:1], DEFAULT_TOLERANCES, reference=reference)[0].status == "failed"


# --------------------------------------------------------------------------- TensorRT, on stand-ins


class _FakeCudart:
    """cuda-python's runtime on one fake GPU: device memory is bytearrays; records mallocs and frees."""

    class cudaMemcpyKind:  # noqa: N801  (cuda-python's name)
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = "h2d", "d2h"

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []
        self.streams = 0

    def cudaGetDeviceCount(self) -> tuple[int, int]:  # noqa: N802
        return 0, 1

    def cudaSetDevice(self, device: int) -> tuple[int]:  # noqa: N802
        return (0,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, object]:  # noqa: N802
        import types

        return 0, types.SimpleNamespace(name=b"Fake GPU", major=9, minor=0)

    def cudaMalloc(self, size: int) -> tuple[int, int]:  # noqa: N802
        ptr = 1000 + len(self.memory)
        self.memory[ptr] = bytearray(size)
        return 0, ptr

    def cudaFree(self, ptr: int) -> tuple[int]:  # noqa: N802
        self.freed.append(ptr)
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, int]:  # noqa: N802
        self.streams += 1
        return 0, 7

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:  # noqa: N802
        self.streams -= 1
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: str, stream: int) -> tuple[int]:  # noqa: N802
        import ctypes

        if kind == "h2d":
            self.memory[dst][:nbytes] = ctypes.string_at(src, nbytes)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:nbytes]), nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:  # noqa: N802
        return (0,)


def _fake_tensorrt(cudart: _FakeCudart, classes: int, size: int) -> object:
    """A ``tensorrt`` module whose engine returns, per image, the first ``classes`` input values."""
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0"  # type: ignore[attr-defined]
    trt.Builder = object  # type: ignore[attr-defined]  # require_tensorrt's check for a real install
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.n = 0

        def set_tensor_address(self, name: str, ptr: int) -> None:
            self.addresses[name] = ptr

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.n = shape[0]
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (self.n, classes)

        def execute_async_v3(self, stream: int) -> bool:
            x = np.frombuffer(bytes(cudart.memory[self.addresses["input"]]), np.float32)[:self.n * 3 * size * size]
            out = x.reshape(self.n, -1)[:, :classes].astype(np.float32)
            cudart.memory[self.addresses["logits"]][:out.nbytes] = out.tobytes()
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ("input", "logits")[i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "input" else "out"

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
            return (1, 3, size, size), (4, 3, size, size), (8, 3, size, size)

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 3, size, size) if name == "input" else (-1, classes)

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine()

    trt.Runtime = Runtime  # type: ignore[attr-defined]
    return trt


def test_tensorrt_runner_acquires_in_activate_and_reads_its_sidecar_once(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import tl_deploy.runtime.gpu as gpu
    import tl_deploy.runtime.tensorrt_backend as backend
    from tl_deploy.fileio import sha256_file
    from tl_deploy.formats.engine_sidecar import BatchProfile, make_sidecar, sidecar_path
    from tl_deploy.formats.metadata import OnnxMetadata
    from tl_deploy.preprocess import PreprocessSpec

    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(cudart, classes=3, size=4))
    monkeypatch.setattr(gpu, "import_cudart", lambda: cudart)
    reads: list[Path] = []
    real_read = backend.read_sidecar
    monkeypatch.setattr(backend, "read_sidecar", lambda path: reads.append(Path(path)) or real_read(path))
    engine = tmp_path / "model.fp32.engine"
    engine.write_bytes(b"serialized")
    metadata = OnnxMetadata(class_names=("a", "b", "c"), spec=PreprocessSpec(input_size=4, resize=4),
                            source_checksum="0" * 64, architecture="fake")
    sidecar = make_sidecar(env={"tensorrt": "10.0.0", "gpu": "Fake GPU", "compute_capability": "9.0"},
                           precision="fp32", profile=BatchProfile(1, 4, 8), input_name="input",
                           input_shape=(-1, 3, 4, 4), workspace_bytes=1, strongly_typed=True, onnx_file="model.onnx",
                           onnx_sha256="1" * 64, engine_sha256=sha256_file(engine), metadata=metadata,
                           build_seconds=0.0)
    sidecar_path(engine).write_text(json.dumps(sidecar))

    runner = backend.TensorRTRunner(engine)
    assert not cudart.memory and not reads  # settings only
    with runner:
        assert len(cudart.memory) == 2 and cudart.streams == 1 and reads == [engine]
        assert runner.metadata == metadata and runner.precision == "fp32" and runner.max_batch == 8
        x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
        np.testing.assert_array_equal(runner.infer(x), x.reshape(2, -1)[:, :3])
        with pytest.raises(DataError, match="over the runner's maximum 8"):
            runner.infer(np.zeros((9, 3, 4, 4), np.float32))
        with pytest.raises(DataError, match="has 5 on axis 2"):
            runner.infer(np.zeros((1, 3, 5, 4), np.float32))
    assert sorted(cudart.freed) == sorted(cudart.memory) and cudart.streams == 0  # everything released
    clf = backend.load_engine(engine)
    assert clf.class_names == ["a", "b", "c"] and clf.device.startswith("cuda:0 (Fake GPU)")
    clf.close()
