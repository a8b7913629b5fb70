"""Runtime: one interface over torch / onnxruntime / TensorRT, the artifact's preprocessing, auto choice."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_streams_match_serial
from tl_deploy.errors import ArtifactError, BackendUnavailableError, DataError, TlDeployError
from tl_deploy.preprocess import prepare
from tl_deploy.runtime import choose_export_file, load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def test_images(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def torch_clf(tiny_artifact: Path):
    return load(tiny_artifact, device="cpu")  # the reference: exact FP32 on every machine, GPU or not


def test_artifact_folder_loads_torch(torch_clf, tiny_artifact: Path) -> None:
    assert torch_clf.backend_name == "torch" and torch_clf.precision == "fp32" and torch_clf.device == "cpu"
    assert torch_clf.class_names == ["circle", "square", "bar"] and torch_clf.source == tiny_artifact


def test_predict_accepts_paths_pil_arrays_and_bytes(torch_clf, test_images: list[Path]) -> None:
    path = test_images[0]
    pil = Image.open(path)
    as_array = np.asarray(pil.convert("RGB"))
    results = [torch_clf.predict(x, top_k=3) for x in (path, str(path), pil, as_array, path.read_bytes())]
    for labels, probs in results:
        assert len(labels) == 1 and sorted(labels[0]) == sorted(torch_clf.class_names)
        assert probs.shape == (1, 3) and np.all(np.diff(probs[0]) <= 0) and abs(probs.sum() - 1) < 1e-5
        np.testing.assert_allclose(probs, results[0].probabilities, atol=1e-6)
    batch = torch_clf.predict(test_images[:5])
    assert len(batch.labels) == 5 and batch.probabilities.shape == (5, 1)
    stacked = torch_clf.predict(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in test_images[:4]]))
    assert len(stacked.labels) == 4  # a (N, H, W, C) array is a batch


def test_export_folder_auto_falls_back_to_onnxruntime(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tl_deploy.runtime.openvino_auto_choice", lambda: (None, "OpenVINO is not installed"))
    clf = load(export_dir, device="cpu")  # no engine, no GPU, no OpenVINO: onnxruntime's CPU provider
    assert clf.backend_name == "onnxruntime" and clf.device == "cpu"
    assert clf.precision == "int8" and clf.source.name == "model.int8.cpu.onnx"  # fastest on CPU
    fp32 = load(export_dir, precision="fp32", device="cpu")
    assert fp32.precision == "fp32" and fp32.source.name == "model.onnx"


def test_onnxruntime_matches_torch(export_dir: Path, torch_clf, test_images: list[Path]) -> None:
    clf = load(export_dir / "model.onnx", backend="onnxruntime", device="cpu")  # both FP32 on the CPU
    x = torch_clf.preprocess(test_images)  # (N, 3, H, W), the artifact's own preprocessing
    np.testing.assert_array_equal(x[2], prepare(test_images[2], torch_clf.spec))
    assert np.abs(clf.infer(x) - torch_clf.infer(x)).max() <= 1e-4
    assert clf.predict(test_images, top_k=2).labels == torch_clf.predict(test_images, top_k=2).labels


def test_int8_runtime_keeps_most_predictions(export_dir: Path, torch_clf, test_images: list[Path]) -> None:
    int8 = load(export_dir, precision="int8", device="cpu")
    same = [a == b for a, b in zip(int8.predict(test_images).labels, torch_clf.predict(test_images).labels)]
    assert np.mean(same) >= 0.8


def test_baked_preprocess_file_predicts_like_float_file(export_dir: Path, torch_clf, test_images) -> None:
    baked = load(export_dir / "model.preprocess.onnx", device="cpu")
    assert baked.runner.input_layout == "uint8_nhwc"
    assert baked.predict(test_images).labels == torch_clf.predict(test_images).labels
    x = torch_clf.preprocess(test_images[:4])
    assert np.abs(baked.infer(x) - torch_clf.infer(x)).max() <= 1e-4  # float batch -> pixels -> graph


def test_infer_chunks_large_batches(export_dir: Path, torch_clf, test_images) -> None:
    clf = load(export_dir / "model.onnx", device="cpu")
    x = np.repeat(torch_clf.preprocess(test_images[:1]), 70, axis=0)  # > 64 per runner call
    out = clf.infer(x)
    assert out.shape == (70, 3) and np.allclose(out, out[:1], atol=1e-5)


def test_onnxruntime_streams_split_the_threads(export_dir: Path, tiny_artifact: Path,
                                              test_images: list[Path]) -> None:
    """streams=2 of threads=2: one intra-op thread per call, two calls at once, the same logits."""
    with load(export_dir / "model.onnx", device="cpu", threads=2, streams=2) as clf:
        assert clf.streams == 2 and clf.runner.session.get_session_options().intra_op_num_threads == 1
        assert_streams_match_serial(clf, test_images)
    with load(export_dir / "model.onnx", device="cpu", threads=2) as clf:
        assert clf.streams == 1 and clf.runner.session.get_session_options().intra_op_num_threads == 2
    with load(tiny_artifact, device="cpu", streams=2) as clf:
        assert clf.streams == 1  # torch: one inference thread
    with pytest.raises(TlDeployError, match="Invalid streams=0"):
        load(export_dir, streams=0)


THREADS, PER_THREAD = 8, 200


@pytest.mark.parametrize("which", ["torch", "model.onnx", "model.int8.cpu.onnx", "model.int8.onnx",
                                   "model.preprocess.onnx", "openvino:model.onnx", "openvino:model.int8.onnx"])
def test_8_threads_x_200_predictions_equal_the_serial_results(which: str, tiny_artifact: Path, export_dir: Path,
                                                              test_images: list[Path]) -> None:
    """One shared classifier per backend; paths, bytes, PIL images and arrays mixed; bit-identical results."""
    backend, _, file = which.rpartition(":")
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tl_deploy[openvino]')")
    clf = load(tiny_artifact, device="cpu") if which == "torch" else \
        load(export_dir / file, backend=backend or "auto", device="cpu")
    assert clf.thread_safe
    inputs: list[object] = []
    for i, path in enumerate(test_images):
        kind = i % 4
        inputs.append(path if kind == 0 else path.read_bytes() if kind == 1 else
                      Image.open(path).convert("L") if kind == 2 else np.asarray(Image.open(path).convert("RGB")))
    serial = [clf.predict(x, top_k=3) for x in inputs]
    barrier = threading.Barrier(THREADS)
    done = [0] * THREADS
    mismatches: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        barrier.wait()  # all threads start together
        try:
            for i in rng.integers(0, len(inputs), PER_THREAD):
                got = clf.predict(inputs[i], top_k=3)
                if got.labels != serial[i].labels or not np.array_equal(got.probabilities, serial[i].probabilities):
                    mismatches.append((t, int(i)))
                done[t] += 1
        except BaseException as exc:  # reported below; a thread must not die silently
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert sum(done) == THREADS * PER_THREAD and not mismatches, mismatches[:10]


def test_torch_forward_passes_all_run_on_one_thread(tiny_artifact: Path, test_images: list[Path]) -> None:
    """Callers on 4 threads: the model always runs on the runner's one inference thread, never a caller's.

    Each thread that runs the model allocates from its own glibc malloc arena, and each arena keeps
    its peak: with a shared classifier, resident memory grew under sustained load (bench/soak.py).
    """
    clf = load(tiny_artifact)
    callers: set[int] = set()
    forward_threads: list[int] = []
    clf.runner.model.register_forward_hook(lambda *_: forward_threads.append(threading.get_ident()))
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work() -> None:
        callers.add(threading.get_ident())
        barrier.wait()
        try:
            for path in test_images[:5]:
                clf.predict([path, path], top_k=1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clf.close()
    assert not errors, errors[:3]
    assert len(forward_threads) == 4 * 5
    assert len(set(forward_threads)) == 1 and not set(forward_threads) & (callers | {threading.get_ident()})


def test_onnxruntime_path_does_not_import_torch(export_dir: Path, test_images) -> None:
    code = (
        "import sys\n"
        "from tl_deploy.runtime import load\n"
        f"clf = load({str(export_dir / 'model.int8.cpu.onnx')!r}, backend='onnxruntime')\n"
        f"labels, probs = clf.predict([{str(test_images[0])!r}, {str(test_images[-1])!r}], top_k=2)\n"
        "auto = load(" + repr(str(export_dir)) + ")\n"
        "assert auto.backend_name == 'onnxruntime', auto.backend_name\n"
        "assert len(labels) == 2 and probs.shape == (2, 2)\n"
        "heavy = [m for m in ('torch', 'torchvision', 'timm', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_load_errors(tmp_path: Path, tiny_artifact: Path, export_dir: Path, torch_clf, test_images) -> None:
    with pytest.raises(ArtifactError, match="Model not found"):
        load(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="neither a model artifact"):
        load(tmp_path)
    with pytest.raises(ArtifactError, match="export it first"):
        load(tiny_artifact, backend="onnxruntime")
    with pytest.raises(TlDeployError, match="Invalid backend 'cuda'"):
        load(export_dir, backend="cuda")
    with pytest.raises(ArtifactError, match="only backend='tensorrt'"):
        (tmp_path / "m.engine").write_bytes(b"x")
        load(tmp_path / "m.engine", backend="onnxruntime")
    with pytest.raises(ArtifactError, match="Unknown model file type"):
        (tmp_path / "m.pt").write_bytes(b"x")
        load(tmp_path / "m.pt")
    with pytest.raises(ArtifactError, match="holds no PyTorch model"):
        load(export_dir, backend="torch")
    with pytest.raises(BackendUnavailableError, match="providers"):
        load(export_dir / "model.onnx", providers=["NoSuchExecutionProvider"])
    with pytest.raises(DataError, match="Invalid top_k 4"):
        torch_clf.predict(test_images[0], top_k=4)
    with pytest.raises(DataError, match=r"infer\(\) takes a \(N, 3, 32, 32\) float32 batch"):
        torch_clf.infer(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(DataError, match="No images"):
        torch_clf.predict([])


def test_export_manifest_lists_files_for_the_runtime(export_dir: Path) -> None:
    files = json.loads((export_dir / "export.json").read_text())["files"]
    assert [(f["file"], f["precision"], f["target"]) for f in files] == [
        ("model.onnx", "fp32", "any"), ("model.preprocess.onnx", "fp32", "any"),
        ("model.int8.onnx", "int8", "tensorrt"), ("model.int8.cpu.onnx", "int8", "cpu")]


# --------------------------------------------------------------------------- choice logic (pure)

FILES = [
    {"file": "model.onnx", "kind": "onnx", "precision": "fp32", "target": "any", "status": "ok"},
    {"file": "model.preprocess.onnx", "kind": "onnx", "precision": "fp32", "target": "any", "status": "ok",
     "input_layout": "uint8_nhwc"},
    {"file": "model.int8.onnx", "kind": "onnx", "precision": "int8", "target": "tensorrt", "status": "ok"},
    {"file": "model.int8.cpu.onnx", "kind": "onnx", "precision": "int8", "target": "cpu", "status": "ok"},
    {"file": "model.int8.engine", "kind": "engine", "precision": "int8", "target": "tensorrt", "status": "ok"},
    {"file": "model.fp16.engine", "kind": "engine", "precision": "fp16", "target": "tensorrt", "status": "ok"},
]


@pytest.mark.parametrize(("backend", "precision", "trt", "gpu", "expected"), [
    ("auto", "auto", True, True, "model.int8.engine"),
    ("auto", "fp16", True, True, "model.fp16.engine"),
    ("tensorrt", "auto", True, False, "model.int8.engine"),
    ("auto", "auto", False, False, "model.int8.cpu.onnx"),
    ("auto", "auto", False, True, "model.onnx"),
    ("onnxruntime", "auto", True, False, "model.int8.cpu.onnx"),
    ("onnxruntime", "int8", False, True, "model.int8.onnx"),
    ("onnxruntime", "fp32", False, False, "model.onnx"),
])
def test_choose_export_file(backend, precision, trt, gpu, expected) -> None:
    chosen, reason = choose_export_file(FILES, backend=backend, precision=precision, tensorrt_ok=trt, ort_gpu=gpu)
    assert chosen["file"] == expected and reason


def test_choose_export_file_refusals() -> None:
    with pytest.raises(BackendUnavailableError, match="TensorRT/CUDA is not usable"):
        choose_export_file(FILES, backend="tensorrt", precision="auto", tensorrt_ok=False, ort_gpu=False)
    with pytest.raises(ArtifactError, match="No fp32 TensorRT engine"):
        choose_export_file(FILES, backend="tensorrt", precision="fp32", tensorrt_ok=True, ort_gpu=False)
    with pytest.raises(ArtifactError, match="No fp16 ONNX file"):
        choose_export_file(FILES, backend="onnxruntime", precision="fp16", tensorrt_ok=False, ort_gpu=False)
    with pytest.raises(TlDeployError, match="Invalid precision 'int4'"):
        choose_export_file(FILES, backend="auto", precision="int4", tensorrt_ok=False, ort_gpu=False)


MALLOC_PROBE = """
import ctypes, sys, threading
import numpy as np
from tl_deploy.runtime import load
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
load(sys.argv[1])
def work():
    for _ in range(3):  # a decoded photo's worth of memory, made and freed
        block = np.ones(12 * 2**20, dtype=np.uint8)
        del block
before = mallinfo2().arena
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print((mallinfo2().arena - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="glibc malloc only")
def test_large_blocks_freed_by_many_threads_are_returned_to_the_system(tiny_artifact: Path) -> None:
    """After ``load``, 12 MiB blocks freed on 4 threads leave no memory behind in the threads' malloc arenas.

    By default glibc raises its mmap threshold to each large block freed, so the next ones come
    from the thread's arena, which keeps them: 4 threads held ~12 MiB each for good.
    """
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, str(tiny_artifact)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    held_mib = float(out.stdout.strip().splitlines()[-1])
    assert held_mib < 4, f"{held_mib:.1f} MiB of freed blocks kept in malloc arenas"
