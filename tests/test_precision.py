"""Training precision: ``--amp auto`` is fp32 on a CPU unless bf16 measures faster there; the bf16 paths
themselves, forced with ``amp="bf16"``, so they run on every CPU (emulated where bf16 is not native)."""

from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from tl_deploy.artifact import load_artifact
from tl_deploy.cli import setup_logging
from tl_deploy.errors import TlDeployError
from tl_deploy.train import amp as amp_module
from tl_deploy.train import finetuning, recipe, stage_cache
from tl_deploy.train.amp import AmpChoice, measure_amp, resolve_amp, time_train_step
from tl_deploy.train.recipe import fit

from .test_distributed import config as dist_config
from .test_finetune import tiny_config

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only its type is read: no GPU is needed


def fake_step_ms(fp32: float, bf16: float):  # type: ignore[no-untyped-def]
    def time_step(net, x, y, device, amp, freeze_bn):  # type: ignore[no-untyped-def]
        return bf16 if amp == torch.bfloat16 else fp32

    return time_step


# ----------------------------------------------------------------------------- the choice


def test_auto_on_a_cpu_without_native_bf16_is_fp32_and_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: False)
    choice = resolve_amp("auto", CPU)
    assert choice.dtype is None and not choice.to_measure and "no native bf16" in choice.reason


def test_auto_on_a_bf16_cpu_is_fp32_unless_bf16_measures_clearly_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: True)
    pending = resolve_amp("auto", CPU)
    assert pending.dtype is None and pending.to_measure
    slower = measure_amp(pending, lambda dtype: 105.0 if dtype == torch.bfloat16 else 80.0)  # issue 13's CPU
    assert slower.dtype is None and slower.step_ms == {"fp32": 80.0, "bf16": 105.0} and "fp32" in slower.reason
    marginal = measure_amp(pending, lambda dtype: 90.0 if dtype == torch.bfloat16 else 100.0)  # 1.11x: noise
    assert marginal.dtype is None
    faster = measure_amp(pending, lambda dtype: 40.0 if dtype == torch.bfloat16 else 100.0)
    assert faster.dtype == torch.bfloat16 and "2.50x faster" in faster.reason and faster.name == "bfloat16"


def test_explicit_modes_are_never_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("off", CPU) == AmpChoice(None, "--amp off")
    assert resolve_amp("bf16", CPU) == AmpChoice(torch.bfloat16, "--amp bf16")
    with pytest.raises(TlDeployError, match="--amp fp16 needs a CUDA device"):
        resolve_amp("fp16", CPU)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_counts_only_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool,
                                              expected: torch.dtype) -> None:
    """A T4/V100 emulates bf16: ``is_bf16_supported()`` says yes unless asked ``including_emulation=False``."""
    seen: list[bool] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        seen.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    choice = resolve_amp("auto", CUDA)
    assert seen == [False] and choice.dtype == expected and not choice.to_measure


def test_time_train_step_leaves_the_network_untouched() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    for amp in (None, torch.bfloat16):
        ms = time_train_step(net, x, y, CPU, amp, bn_eval=False, steps=2)
        assert 0 < ms < 60_000
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics included
    assert all(p.grad is None for p in net.parameters())


# ----------------------------------------------------------------------------- end to end: config.json


@pytest.mark.parametrize(("bf16_ms", "used"), [(105.0, "off"), (40.0, "bfloat16")])
def test_auto_records_the_measured_choice(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          bf16_ms: float, used: str) -> None:
    """Either branch on any CPU: the CPU capability and the timing are faked, the training is real."""
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(recipe, "time_train_step", fake_step_ms(fp32=80.0, bf16=bf16_ms))
    used_in_training: list[torch.dtype | None] = []
    real_epoch = finetuning.train_one_epoch

    def recording_epoch(*args, **kwargs):  # type: ignore[no-untyped-def]
        used_in_training.append(args[6])  # the amp dtype
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(finetuning, "train_one_epoch", recording_epoch)
    path = fit(tiny_config(tiny_data, tmp_path / "run", strategy="lp-ft", epochs=1, unfreeze=1, amp="auto"))
    training = json.loads((path / "config.json").read_text())["training"]
    assert training["amp"] == "auto" and training["amp_used"] == used
    assert training["amp_step_ms"] == {"fp32": 80.0, "bf16": bf16_ms}
    assert "measured" in training["amp_reason"]
    assert used_in_training == [torch.bfloat16 if used == "bfloat16" else None]


def test_auto_measures_the_real_trained_layers(tiny_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: True)
    shapes: list[tuple[int, ...]] = []
    real = recipe.time_train_step

    def recording(net, x, y, device, amp, freeze_bn):  # type: ignore[no-untyped-def]
        shapes.append(tuple(x.shape))
        assert any(p.requires_grad for p in net.parameters())
        return real(net, x, y, device, amp, freeze_bn, steps=1)

    monkeypatch.setattr(recipe, "time_train_step", recording)
    path = fit(tiny_config(tiny_data, tmp_path / "run", strategy="lp-ft", epochs=1, unfreeze=1, amp="auto"))
    training = json.loads((path / "config.json").read_text())["training"]
    assert training["frozen_stage_cache"] and len(shapes) == 2
    assert shapes[0][0] == 8 and shapes[0][1] != 3  # a micro-batch of the cached stage outputs, not images
    assert set(training["amp_step_ms"]) == {"fp32", "bf16"} and all(v > 0 for v in training["amp_step_ms"].values())
    assert training["amp_used"] in ("off", "bfloat16")


# ----------------------------------------------------------------------------- forced bf16 (any CPU)

BF16_RTOL, BF16_ATOL = 0.05, 0.03  # bf16 keeps 8 mantissa bits; measured here: 0.011 (cache) and 0.007 (accum) at most


def assert_close_in_bf16(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, b[key], rtol=BF16_RTOL, atol=BF16_ATOL, msg=key)


def test_bf16_frozen_stage_cache_matches_running_every_layer(tiny_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "cached", strategy="lp-ft", epochs=2, unfreeze=2, deterministic=True,
                      cache_runtime="torch", amp="bf16")
    cached = fit(cfg)
    fp32 = fit(replace(cfg, out=str(tmp_path / "fp32"), amp="off"))
    monkeypatch.setattr(stage_cache, "ACTIVATION_CACHE_MAX_BYTES", 0)  # forces the every-layer path
    full = fit(replace(cfg, out=str(tmp_path / "full")))
    training = [json.loads((p / "config.json").read_text())["training"] for p in (cached, full)]
    assert [t["frozen_stage_cache"] for t in training] == [True, False]
    assert [t["amp_used"] for t in training] == ["bfloat16", "bfloat16"]
    a, b = load_artifact(cached).model.state_dict(), load_artifact(full).model.state_dict()
    assert_close_in_bf16(a, b)
    reference = load_artifact(fp32).model.state_dict()
    assert any(not torch.equal(a[k], reference[k]) for k in a)  # bf16 really ran: not the fp32 weights


def test_bf16_gradient_accumulation_keeps_the_global_batch(tiny_data: Path, tmp_path: Path) -> None:
    one = fit(dist_config(tiny_data, tmp_path / "one", amp="bf16"))
    accumulated = fit(dist_config(tiny_data, tmp_path / "accum", amp="bf16", grad_accum_steps=4))
    assert json.loads((accumulated / "config.json").read_text())["training"]["amp_used"] == "bfloat16"
    assert_close_in_bf16(load_artifact(one).model.state_dict(), load_artifact(accumulated).model.state_dict())


# ----------------------------------------------------------------------------- logging


def test_logging_follows_sys_stderr_after_a_capture_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest (or any caller) swaps sys.stderr per test and closes the old one; the handler must not keep it."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging(False)
    logging.getLogger("tl_deploy.test").info("first")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("tl_deploy.test").info("second")
    assert second.getvalue() == "second\n"  # not "--- Logging error --- ValueError: I/O operation on closed file"
