"""The preprocessing spec starts from the weights' own data config, takes the user's flags on top, records
where each value came from, and sizes itself to the data (--img-size auto); fixed-size backbones (ViT) train,
export and pass parity at their own size and at a size the user asks for."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_deploy.artifact import Architecture, load_artifact
from tl_deploy.backbones import create_model, model_data_config
from tl_deploy.errors import DataError, ModelError, TlDeployError
from tl_deploy.formats.metadata import read_onnx_metadata
from tl_deploy.model_card import read_model_card
from tl_deploy.preprocess import IMAGENET_MEAN, PreprocessSpec
from tl_deploy.train.cli import config_from_args, get_args_parser
from tl_deploy.train.config import TrainConfig, auto_img_size
from tl_deploy.train.recipe import fit
from tl_deploy.train.setup import native_size

from .conftest import TINY_CLASSES, draw_shape

VIT = "vit_tiny_patch16_224"
AUGREG = "vit_tiny_patch16_224.augreg_in21k"


def parse(*argv: str) -> TrainConfig:
    return config_from_args(get_args_parser().parse_args(list(argv)))


def shapes_folder(root: Path, side: int, per_split: dict[str, int]) -> Path:
    """An ImageFolder of the test shapes drawn at ``side`` pixels (the data's native resolution)."""
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for name in TINY_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(name, rng, size=side).save(folder / f"{i:03d}.png")
    return root


def vit_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = dict(data=str(data), model=VIT, weights="none", strategy="linear", probe_epochs=2,
                                     batch_size=8, out=str(out), no_cache=True, workers=0, amp="off", device="cpu")
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the model's own data config

def test_augreg_vit_gets_its_own_normalisation_and_crop() -> None:
    spec = parse("--model", AUGREG, "--weights", "hub").spec(native_size=256)
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert (spec.input_size, spec.resize, spec.interpolation) == (224, round(224 / 0.9), "bicubic")
    assert spec.provenance["mean"] == spec.provenance["resize"] == f"model:timm pretrained_cfg {AUGREG}"
    assert model_data_config(AUGREG, "hub").fixed_input_size


def test_animal_shape_default_is_the_measured_preprocessing() -> None:
    """28-px silhouettes: 112 px, whole image, bilinear (val: better than the model's crop 0.875 + bicubic)."""
    assert TrainConfig().spec(native_size=28) == PreprocessSpec(input_size=112, resize=112, interpolation="bilinear")


def test_embedded_weights_keep_imagenet_normalisation() -> None:
    spec = TrainConfig().spec(native_size=256)
    assert (spec.mean, spec.input_size, spec.resize, spec.interpolation) == (IMAGENET_MEAN, 224, 256, "bicubic")
    assert spec.provenance["mean"].startswith("model:embedded efficientnet_lite0")


def test_user_flags_win_and_are_recorded() -> None:
    cfg = parse("--model", AUGREG, "--weights", "hub", "--mean", "0.1", "0.2", "0.3", "--std", "0.3", "0.3", "0.4",
                "--crop-pct", "0.8", "--interpolation", "bilinear", "--img-size", "64")
    spec = cfg.spec(native_size=256)
    assert (spec.mean, spec.std) == ((0.1, 0.2, 0.3), (0.3, 0.3, 0.4))
    assert (spec.input_size, spec.resize, spec.interpolation) == (64, 80, "bilinear")
    assert spec.provenance == {"input_size": "user:--img-size", "resize": "user:--crop-pct",
                               "interpolation": "user:--interpolation", "mean": "user:--mean", "std": "user:--std"}


@pytest.mark.parametrize("argv, message", [
    (("--std", "0.5", "0", "0.5"), "--std"),
    (("--mean", "0.5", "0.5"), "--mean"),
    (("--img-size", "big"), "--img-size"),
    (("--interpolation", "cubic"), "--interpolation"),
])
def test_bad_preprocess_flags_are_refused(argv: tuple[str, ...], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"img_size": "big"}, "--img-size 'big': choose auto or an integer"),
    ({"interpolation": "cubic"}, "--interpolation 'cubic'"),
    ({"mean": (0.5, 0.5)}, "--mean (0.5, 0.5): give 3 numbers"),
    ({"std": (0.5, -1.0, 0.5)}, "--std -1.0"),
    ({"balance": None}, "--balance None"),  # None means "from the model" only for the preprocessing fields
])
def test_library_callers_get_the_same_refusals(values: dict[str, object], message: str) -> None:
    with pytest.raises(TlDeployError, match=re.escape(message)):
        TrainConfig(**values).validate()  # type: ignore[arg-type]


def test_spec_without_source_still_loads_and_bad_sources_are_refused() -> None:
    old = {"input_size": 112, "resize": 112, "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
           "std": [0.229, 0.224, 0.225], "channel_order": "RGB", "layout": "NCHW", "background": [0, 0, 0]}
    spec = PreprocessSpec.from_dict(old)
    assert spec.provenance == {} and "source" not in spec.to_dict()
    recorded = PreprocessSpec.from_dict({**old, "source": {"mean": "user:--mean"}})
    assert recorded == spec and recorded.to_dict()["source"] == {"mean": "user:--mean"}  # provenance is not value
    assert PreprocessSpec.from_dict(json.loads(json.dumps(recorded.to_dict()))).provenance == {"mean": "user:--mean"}
    for bad in ({"layout": "x"}, ["mean"], {"mean": 3}, {"mean": "x" * 201}):
        with pytest.raises(DataError):
            PreprocessSpec.from_dict({**old, "source": bad})


# ----------------------------------------------------------------------------- --img-size auto

def test_small_and_large_folders_get_different_automatic_sizes(tmp_path: Path) -> None:
    icons = shapes_folder(tmp_path / "icons", 16, {"train": 3})
    photos = shapes_folder(tmp_path / "photos", 256, {"train": 3})
    samples = {name: [(p, 0) for p in sorted((root / "train").rglob("*.png"))]
               for name, root in (("icons", icons), ("photos", photos))}
    assert native_size(samples["icons"], seed=0) == 16 and native_size(samples["photos"], seed=0) == 256
    small, large = (TrainConfig().spec(native_size(s, seed=0)) for s in samples.values())
    assert (small.input_size, small.resize, small.interpolation) == (64, 64, "bilinear")  # 4x, whole image
    assert (large.input_size, large.resize, large.interpolation) == (224, 256, "bicubic")  # the model's own
    assert small.provenance["input_size"].startswith("auto:data native 16 px")
    assert large.provenance["input_size"].startswith("auto:model's 224 px")


def test_auto_size_rule() -> None:
    assert auto_img_size(224, 28)[0] == 112  # Animal-Shape: the measured size
    assert auto_img_size(224, 5)[0] == 32  # never below one 32-pixel cell
    assert auto_img_size(224, 60)[0] == 224  # 4x 60 is above the pretrained size
    assert auto_img_size(160, None) == (160, "auto:model's 160 px (data resolution not measured)")
    assert TrainConfig(img_size=96).spec(28).input_size == 96  # a given size is kept


def test_native_size_reads_headers_only_and_skips_unreadable_files(tmp_path: Path) -> None:
    good = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    assert native_size([(good, 0), (bad, 0)], seed=0) == 30
    assert native_size([(bad, 0)], seed=0) is None


# ----------------------------------------------------------------------------- fixed-size backbones

def test_vit_is_built_for_the_asked_size_and_resamples_weights_trained_at_another(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    at_224 = create_model(VIT, num_classes=3, weights="none")
    weights = tmp_path / "vit224.safetensors"
    save_file({k: v.contiguous() for k, v in at_224.state_dict().items()}, str(weights))
    at_32 = create_model(VIT, num_classes=3, weights=str(weights), img_size=32)
    expected = resample_abs_pos_embed(at_224.pos_embed.detach(), new_size=(2, 2), num_prefix_tokens=1)
    torch.testing.assert_close(at_32.pos_embed.detach(), expected)
    torch.testing.assert_close(at_32.blocks[0].attn.qkv.weight, at_224.blocks[0].attn.qkv.weight)
    assert at_32(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ModelError, match="multiple of 16"):
        create_model(VIT, num_classes=3, weights="none", img_size=40)
    assert Architecture.from_dict(Architecture(VIT, 3, img_size=32).to_dict()).img_size == 32
    assert "img_size" not in Architecture("efficientnet_lite0", 3).to_dict()  # any-size networks record none


def export_and_check_parity(artifact: Path, data: Path, out: Path) -> None:
    from tl_deploy.export import ExportOptions, export_artifact
    from tl_deploy.parity import run_parity

    export_artifact(artifact, out, ExportOptions())
    recorded = load_artifact(artifact).spec
    exported = read_onnx_metadata(str(out / "model.onnx")).spec
    assert exported == recorded and exported.provenance == recorded.provenance
    report = run_parity(artifact, out, data=data, backends=["onnx-fp32"], threads=2)
    assert report, report


def test_vit_trains_exports_and_passes_parity_at_its_own_size(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    data = shapes_folder(tmp_path / "data", 64, {"train": 4, "val": 2, "test": 2})
    with caplog.at_level(logging.INFO, logger="tl_deploy.train.recipe"):
        artifact = fit(vit_config(data, tmp_path / "run"))
    assert any("preprocessing: 224 px [auto:model's 224 px (data native 64 px)]" in r.message
               for r in caplog.records)
    config = json.loads((artifact / "config.json").read_text())
    assert config["architecture"]["img_size"] == 224 and config["training"]["native_size"] == 64
    assert config["preprocess"]["mean"] == [0.5, 0.5, 0.5] and config["preprocess"]["input_size"] == 224
    export_and_check_parity(artifact, data, tmp_path / "export")


def test_vit_trains_at_a_user_size_from_a_weights_file_with_user_normalisation(tiny_data: Path,
                                                                              tmp_path: Path) -> None:
    """The reported case (a ViT weights file, --strategy linear-like run at a small size) and a user
    normalisation that is not ImageNet's: PyTorch and onnxruntime agree on the recorded spec."""
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(VIT, num_classes=5, weights="none").state_dict().items()},
              str(weights))
    cfg = vit_config(tiny_data, tmp_path / "run", weights=str(weights), img_size=32, strategy="finetune", epochs=1,
                     mean=(0.2, 0.3, 0.4), std=(0.3, 0.3, 0.3), crop_pct=1.0)
    artifact = fit(cfg)
    art = load_artifact(artifact)
    assert art.architecture.img_size == 32
    assert (art.spec.input_size, art.spec.mean, art.spec.std) == (32, (0.2, 0.3, 0.4), (0.3, 0.3, 0.3))
    assert art.spec.provenance["mean"] == "user:--mean" and art.spec.provenance["input_size"] == "user:--img-size"
    out = tmp_path / "export"
    export_and_check_parity(artifact, tiny_data, out)
    # The runtime the app and predict use prepares images with the recorded spec: the same probabilities as
    # the PyTorch model fed the recorded normalisation.
    from tl_deploy import runtime
    from tl_deploy.preprocess import prepare

    image = next((tiny_data / "test").rglob("*.png"))
    with torch.no_grad():
        expected = torch.softmax(art.model(torch.from_numpy(prepare(image, art.spec))[None]), dim=1).numpy()
    with runtime.load(out, backend="onnxruntime", device="cpu", threads=2) as clf:
        assert clf.spec == art.spec and clf.spec.provenance == art.spec.provenance
        np.testing.assert_allclose(clf.predict_proba([image]), expected, atol=1e-4)
    card = read_model_card(out)
    assert card.preprocess_origins()["std"] == "user:--std"
    assert "mean (0.2, 0.3, 0.4) [user:--mean]" in card.input_description()


def test_feature_cache_key_ignores_provenance(tmp_path: Path) -> None:
    from tl_deploy.train.feature_cache import cache_key

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    plain = PreprocessSpec()
    sourced = PreprocessSpec(source=(("mean", "user:--mean"),))
    assert cache_key("m", plain, [(image, 0)]) == cache_key("m", sourced, [(image, 0)])
    assert cache_key("m", plain, [(image, 0)]) != cache_key("m", PreprocessSpec(interpolation="bicubic"), [(image, 0)])
