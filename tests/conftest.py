"""Shared fixtures: a tiny generated ImageFolder and a tiny model artifact, built once per session."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

# Thread counts change how oneDNN and onnxruntime split a reduction, so the last float bits of a result
# depend on them: every test runs with the same count, whatever the machine's core count or environment.
TEST_THREADS = 2
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
# Whether `auto` picks OpenVINO depends on the CPU (runtime/cpu.py): the suite pins the choices it had
# without OpenVINO on every machine, subprocesses included; tests/test_openvino.py turns the rule on itself.
os.environ["TL_DEPLOY_OPENVINO"] = "0"

TINY_CLASSES = ["circle", "square", "bar"]
TINY_MODEL = "test_efficientnet"  # timm's ~100k-parameter test architecture
TINY_SIZE = 32


def assert_streams_match_serial(clf: Any, images: list[Path]) -> None:
    """Batches of ``images`` inferred on ``clf.streams`` threads at once give the serial logits, bit for bit."""
    batches = [clf.preprocess(images[i:i + 4]) for i in range(0, 16, 4)]
    serial = [clf.infer(b) for b in batches]
    with ThreadPoolExecutor(clf.streams) as pool:
        at_once = list(pool.map(clf.infer, batches))
    for a, b in zip(at_once, serial):
        np.testing.assert_array_equal(a, b)


def draw_shape(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A white shape of random position and scale on black: trivially separable classes."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.rectangle((2, cy - 2, size - 3, cy + 2), fill=255)
    return img


def make_image_folder(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for name in TINY_CLASSES:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(name, rng).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def pinned_threads() -> None:
    import torch

    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder with train/val/test, 3 separable classes."""
    root = tmp_path_factory.mktemp("tiny_data")
    return make_image_folder(root, {"train": 24, "val": 8, "test": 8})


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved artifact of a tiny timm model (random weights, eval-mode BN stats perturbed)."""
    import torch

    from tl_deploy.artifact import Architecture, save_artifact
    from tl_deploy.backbones import create_model
    from tl_deploy.preprocess import PreprocessSpec

    torch.manual_seed(0)
    arch = Architecture(name=TINY_MODEL, num_classes=len(TINY_CLASSES), drop_rate=0.0)
    model = create_model(arch.name, num_classes=arch.num_classes, weights="none", drop_rate=0.0)
    with torch.no_grad():  # non-trivial BN statistics, so folding and parity are really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("models") / "tiny"
    spec = PreprocessSpec(input_size=TINY_SIZE, resize=TINY_SIZE)
    return save_artifact(out, model.eval(), architecture=arch, class_names=TINY_CLASSES, spec=spec,
                         training={"strategy": "none"}, metrics={"test_acc": 0.0})


@pytest.fixture(scope="session")
def export_dir(tiny_artifact: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact exported to every format that runs here: FP32, both INT8 files, baked preprocessing."""
    from tl_deploy.export import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_artifact(tiny_artifact, out, ExportOptions(int8=True, bake_preprocess=True, calib_data=tiny_data,
                                                      calib_samples=24))
    return out


@pytest.fixture(scope="session")
def app_export(tiny_artifact: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model re-saved with its training data recorded (for the app's gallery), exported to
    ONNX FP32 and INT8 as ``export/tiny`` next to ``models/tiny``: the layout `make demo` leaves."""
    from tl_deploy.artifact import load_artifact, save_artifact
    from tl_deploy.export import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("app_project")
    art = load_artifact(tiny_artifact)
    model_dir = save_artifact(root / "models" / "tiny", art.model, architecture=art.architecture,
                              class_names=art.class_names, spec=art.spec,
                              training={"strategy": "none", "data": str(tiny_data)},
                              metrics={"test_acc": 0.5, "val_acc": 0.5})
    out = root / "export" / "tiny"
    export_artifact(model_dir, out, ExportOptions(int8=True, calib_data=tiny_data, calib_samples=24))
    return out
