from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tl_deploy.backbones import backbone_stages, create_model, read_state_dict, remap_in_order, set_trainable
from tl_deploy.errors import ModelError
from tl_deploy.preprocess import PreprocessSpec, prepare


def test_embedded_weights_classify_a_real_cat_photo() -> None:
    """The positional remap of EfficientNet-PyTorch keys onto timm is right only if a cat is a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    model = create_model("efficientnet_lite0", num_classes=1000, weights="embedded").eval()
    spec = PreprocessSpec.for_size(224, crop_pct=0.875, interpolation="bicubic")
    x = torch.from_numpy(prepare(skimage_data.chelsea(), spec)).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"predicted ImageNet class {top}"  # tabby .. Egyptian cat
    assert float(probs[281:286].sum()) > 0.5


def test_new_head_is_sized_for_the_task_and_backbone_is_pretrained() -> None:
    model = create_model("efficientnet_lite0", num_classes=7, weights="embedded")
    assert model.get_classifier().out_features == 7
    scratch = create_model("efficientnet_lite0", num_classes=7, weights="none")
    assert not torch.equal(model.conv_stem.weight, scratch.conv_stem.weight)


def test_unknown_model_name() -> None:
    with pytest.raises(ModelError, match="Unknown model name 'efficientnet_lite9'"):
        create_model("efficientnet_lite9", weights="none")


def test_no_embedded_weights_for_other_models() -> None:
    with pytest.raises(ModelError, match="No embedded weights for 'test_resnet'"):
        create_model("test_resnet", weights="embedded")


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = create_model("test_resnet", num_classes=3, weights="none")
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ModelError, match="do not fit"):
        create_model("test_efficientnet", num_classes=3, weights=str(path))


def test_local_weights_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = create_model("test_efficientnet", num_classes=5, weights="none")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_model("test_efficientnet", num_classes=3, weights=str(path))  # other head size
    assert torch.equal(dst.conv_stem.weight, src.conv_stem.weight)
    assert dst.get_classifier().out_features == 3


def test_pickle_payload_is_refused(tmp_path: Path) -> None:
    import os

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ModelError, match="Refusing to load"):
        read_state_dict(path)


def test_remap_checks_shapes() -> None:
    with pytest.raises(ModelError, match="does not fit"):
        remap_in_order({"a": torch.zeros(2)}, {"b": torch.zeros(3)})
    out = remap_in_order({"a": torch.ones(2), "a.num_batches_tracked": torch.tensor(1)}, {"b": torch.zeros(2)})
    assert list(out) == ["b"] and torch.equal(out["b"], torch.ones(2))


def test_partial_unfreezing_trains_only_the_last_stages() -> None:
    model = create_model("test_efficientnet", num_classes=3, weights="none")
    stages = backbone_stages(model)
    set_trainable(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier")}
    assert trainable == set(stages[-1]) | head
    set_trainable(model, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    with pytest.raises(ModelError, match="Invalid --unfreeze"):
        set_trainable(model, len(stages) + 1)


@pytest.mark.parametrize("name", ["test_efficientnet", "mobilenetv3_small_050"])
def test_cut_after_stages_composes_to_the_model(name: str) -> None:
    import torch

    from tl_deploy.backbones import backbone_stages, cut_after_stages

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, weights="none").eval()
    x = torch.randn(2, 3, 32, 32)
    n = len(backbone_stages(model))
    for frozen in range(1, n):
        split = cut_after_stages(model, frozen)
        assert split is not None, frozen
        prefix, suffix = split
        torch.testing.assert_close(suffix(prefix(x)), model(x))
        assert len(list(prefix.parameters())) + len(list(suffix.parameters())) == len(list(model.parameters()))
    assert cut_after_stages(model, 0) is None and cut_after_stages(model, n) is None
    assert cut_after_stages(create_model("resnet18", num_classes=3, weights="none"), 1) is None
