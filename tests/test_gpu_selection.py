"""GPU selection checked without a GPU: onnxruntime's CUDA provider and the CUDA-graph runner against a
faked CUDA availability, and the install metadata that decides which onnxruntime a GPU machine gets."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tl_deploy.errors import BackendUnavailableError
from tl_deploy.runtime import load, onnxruntime_backend
from tl_deploy.runtime.gpu import gpu_index
from tl_deploy.runtime.onnxruntime_backend import distribution_conflict, load_onnx, provider_options
from tl_deploy.runtime.torch_backend import TorchCudaGraphRunner, TorchRunner

ROOT = Path(__file__).resolve().parents[1]
# The real CPU-only session warns that it has no CUDA provider: exactly the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")


class Sessions:
    """Records what each InferenceSession was asked for; ``got`` fakes the providers a session reports."""

    def __init__(self, got: list[str] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.got = got

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = ort.InferenceSession
        record = self

        class RecordingSession(real):  # type: ignore[misc, valid-type]
            def __init__(self, path: str, options: Any = None, providers: Any = None,
                         provider_options: Any = None) -> None:
                record.calls.append({"providers": list(providers or []),
                                     "provider_options": list(provider_options or [])})
                super().__init__(path, options, providers=providers, provider_options=provider_options)

            def get_providers(self) -> list[str]:
                return record.got if record.got is not None else list(super().get_providers())

        monkeypatch.setattr(ort, "InferenceSession", RecordingSession)


@pytest.fixture
def cuda_in_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu's provider list, on a machine where the CUDA provider then cannot start."""
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])


# ----------------------------------------------------------------------------- onnxruntime


def test_cuda_provider_runs_on_the_given_gpu_with_tf32_off() -> None:
    assert provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], 1) == [
        {"device_id": "1"}, {"device_id": "1", "use_tf32": "0"}, {}]
    assert [gpu_index(d) for d in ("cuda:3", "cuda", "cpu", None)] == [3, 0, 0, 0]
    with pytest.raises(BackendUnavailableError, match="Invalid device 'cuda:x'"):
        gpu_index("cuda:x")


def test_session_is_created_with_the_cuda_options(export_dir: Path, cuda_in_build: None,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    sessions = Sessions()
    sessions.install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="tl_deploy"):
        clf = load_onnx(export_dir / "model.onnx", device_id=1)
    assert sessions.calls == [{"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                               "provider_options": [{"device_id": "1", "use_tf32": "0"}, {}]}]
    # The build lists CUDA but the session got the CPU only: judged from the session, said in the log.
    assert clf.device == "cpu" and clf.runner.providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
    assert "runs model.onnx on the CPU" in caplog.text and "asked for" in caplog.text


def test_a_session_that_got_cuda_reports_its_gpu(export_dir: Path, cuda_in_build: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    Sessions(got=["CUDAExecutionProvider", "CPUExecutionProvider"]).install(monkeypatch)
    assert load(export_dir / "model.onnx", device="cuda:1").device == "cuda:1"


def test_named_cuda_provider_that_cannot_start_is_an_error(export_dir: Path, cuda_in_build: None) -> None:
    with pytest.raises(BackendUnavailableError, match=r"could not start \['CUDAExecutionProvider'\]"):
        load_onnx(export_dir / "model.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_export_folder_falls_back_to_the_cpu_file_when_cuda_cannot_start(export_dir: Path,
                                                                          cuda_in_build: None) -> None:
    clf = load(export_dir)  # picked for the GPU first (FP32), then for the CPU the session really runs on
    assert clf.device == "cpu" and clf.source.name == "model.int8.cpu.onnx"


def test_device_cpu_uses_the_cpu_provider_only(export_dir: Path, cuda_in_build: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = Sessions()
    sessions.install(monkeypatch)
    clf = load(export_dir, device="cpu")
    assert clf.source.name == "model.int8.cpu.onnx" and sessions.calls[0]["providers"] == ["CPUExecutionProvider"]


def test_two_onnxruntime_distributions_are_named_with_the_fix(export_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert distribution_conflict(["onnxruntime"]) is None
    both = distribution_conflict(["onnxruntime", "onnxruntime-gpu"])
    assert both is not None and "onnxruntime and onnxruntime-gpu are both installed" in both
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in both
    monkeypatch.setattr(onnxruntime_backend, "installed_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(BackendUnavailableError, match="both installed"):
        load_onnx(export_dir / "model.onnx", providers=["CUDAExecutionProvider"])


def test_no_extra_installs_a_second_onnxruntime() -> None:
    """onnxruntime and onnxruntime-gpu own one module: an extra must never add the second one."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra, deps in {"": project["dependencies"], **project["optional-dependencies"]}.items():
        names = {dep.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip().lower() for dep in deps}
        other = {n for n in names if n.startswith("onnxruntime") and n != "onnxruntime"}
        assert not other, f"extra {extra!r} installs {other} beside onnxruntime"


# ----------------------------------------------------------------------------- torch on a faked GPU


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """torch.cuda on two fake GPUs: records on which device each step runs; the calling thread's
    current device is GPU 0."""
    current = ["cuda:0"]
    log: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def switch(device: object) -> Iterator[None]:
        previous, current[0] = current[0], str(torch.device(device))  # type: ignore[call-overload]
        try:
            yield
        finally:
            current[0] = previous

    class Stream:
        def __init__(self, device: object = None) -> None:
            self.device = str(torch.device(device)) if device is not None else current[0]  # type: ignore[call-overload]

        def wait_stream(self, other: Stream) -> None:
            pass

    class Graph:
        def replay(self) -> None:
            log.append(("replay", current[0]))

    @contextlib.contextmanager
    def graph(g: Graph, pool: object = None, stream: Stream | None = None) -> Iterator[None]:
        # torch's default capture stream is made once, on the device current at its first use.
        where = stream.device if stream is not None else current[0]
        log.append(("capture", where))
        with switch(where):
            yield

    real_zeros = torch.zeros

    def zeros(*shape: Any, dtype: Any = None, device: Any = None) -> torch.Tensor:
        log.append(("alloc", str(device)))
        return real_zeros(*shape, dtype=dtype)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: int(current[0].split(":")[1]))
    monkeypatch.setattr(torch.cuda, "device", switch)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: switch(s.device))  # torch switches to the stream's device
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch, "zeros", zeros)
    return log


class FakeGpuModel:
    """Stands in for a module on a GPU: remembers where it was placed and where each call ran."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log
        self.placed = ""

    def to(self, device: object) -> FakeGpuModel:
        self.placed = str(device)
        return self

    def eval(self) -> FakeGpuModel:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(("run", f"cuda:{torch.cuda.current_device()}"))
        return x.flatten(1).sum(1, keepdim=True)  # (N, 1)


def test_cuda_graph_runner_captures_and_replays_on_the_gpu_it_was_given(fake_cuda: list[tuple[str, str]]) -> None:
    model = FakeGpuModel(fake_cuda)
    runner = TorchCudaGraphRunner(model, device="cuda:1")
    runner.activate()
    runner.infer(np.ones((2, 3, 4, 4), np.float32))
    runner.infer(np.ones((2, 3, 4, 4), np.float32))  # the second call replays the captured graph
    assert model.placed == "cuda:1" and runner.device == "cuda:1"
    assert ("capture", "cuda:1") in fake_cuda
    assert [e for e in fake_cuda if e[0] == "replay"] == [("replay", "cuda:1")] * 2
    assert {e for e in fake_cuda if e[0] in ("run", "alloc")} == {("run", "cuda:1"), ("alloc", "cuda:1")}


def test_cuda_graph_runner_on_plain_cuda_keeps_the_gpu_current_when_it_was_made(
        fake_cuda: list[tuple[str, str]]) -> None:
    runner = TorchCudaGraphRunner(FakeGpuModel(fake_cuda), device="cuda")
    runner.activate()
    with torch.cuda.device("cuda:1"):  # another thread's current device later on
        runner.infer(np.ones((1, 3, 4, 4), np.float32))
    assert runner.device == "cuda:0" and ("capture", "cuda:0") in fake_cuda


def test_explicit_cpu_stays_on_the_cpu_when_cuda_is_available(tiny_artifact: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    clf = load(tiny_artifact, device="cpu")
    assert clf.device == "cpu" and isinstance(clf.runner, TorchRunner)
