from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tl_deploy.backbones import backbone_stages, create_model, cut_after_stages, pooled_features
from tl_deploy.errors import TlDeployError
from tl_deploy.train.stage_cache import AUTO_MIN_IMAGES, frozen_forward, resolve_cache_runtime

from .conftest import TINY_MODEL, TINY_SIZE

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_split() -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = create_model(TINY_MODEL, num_classes=3, weights="none")
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    split = cut_after_stages(model, len(backbone_stages(model)) - 2)
    assert split is not None
    return model, split[0], split[1]


def test_onnxruntime_matches_torch_on_prefix_suffix_and_features(tiny_split: tuple[nn.Module, ...]) -> None:
    model, prefix, suffix = tiny_split
    model.train()  # the caller's mode must survive: the passes run in eval mode and restore it
    x = torch.randn(5, 3, TINY_SIZE, TINY_SIZE)  # (B, 3, H, W)
    fast = frozen_forward(prefix, x[:1], runtime="onnxruntime", device=CPU)
    exact = frozen_forward(prefix, x[:1], runtime="torch", device=CPU)
    h = exact(x)
    torch.testing.assert_close(fast(x), h, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(h, prefix.eval()(x.contiguous(memory_format=torch.channels_last)))
    prefix.train()
    feats = frozen_forward(suffix, h[:1], runtime="onnxruntime", device=CPU, call=lambda m, a: m(a, pre_logits=True))
    whole = frozen_forward(model, x[:1], runtime="onnxruntime", device=CPU, call=pooled_features)
    model.eval()
    with torch.no_grad():
        want = pooled_features(model, x)  # (B, D)
    model.train()
    torch.testing.assert_close(feats(h), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole(x), want, rtol=1e-4, atol=1e-5)
    assert feats(h[:2]).shape == (2, want.shape[1])  # any batch size
    assert model.training and prefix.training


def test_runtime_choice() -> None:
    assert resolve_cache_runtime("auto", CPU) == "onnxruntime"
    assert resolve_cache_runtime("auto", CPU, num_images=AUTO_MIN_IMAGES) == "onnxruntime"
    assert resolve_cache_runtime("auto", CPU, num_images=AUTO_MIN_IMAGES - 1) == "torch"  # export costs more
    assert resolve_cache_runtime("onnxruntime", CPU, num_images=1) == "onnxruntime"
    assert resolve_cache_runtime("auto", torch.device("cuda")) == "torch"
    assert resolve_cache_runtime("torch", CPU) == "torch"
    with pytest.raises(TlDeployError, match="--cache-runtime onnxruntime runs on the CPU"):
        resolve_cache_runtime("onnxruntime", torch.device("cuda"))
    with pytest.raises(TlDeployError, match="Invalid --cache-runtime 'tvm'"):
        resolve_cache_runtime("tvm", CPU)


class _NoExport(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("operator not supported")
        return x * 2


def test_export_failure_falls_back_to_torch_under_auto(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.ones(2, 3)
    with caplog.at_level(logging.WARNING, logger="tl_deploy.train.stage_cache"):
        forward = frozen_forward(_NoExport(), x, runtime="auto", device=CPU)
    assert torch.equal(forward(x), x * 2)
    assert "ONNX export failed" in caplog.text
    with pytest.raises(TlDeployError, match="could not export the frozen layers.*--cache-runtime torch"):
        frozen_forward(_NoExport(), x, runtime="onnxruntime", device=CPU)
