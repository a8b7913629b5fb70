"""The autocast precision training runs under: ``--amp`` resolved for a device, measured on a CPU."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tl_deploy.errors import TlDeployError
from tl_deploy.train.loop import autocast, set_train_mode


def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports native bf16 on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# On a CPU, --amp auto trains in bf16 only when a training step measures at least this much faster than
# fp32 on that very machine. Native bf16 is no promise of speed: on an AVX-512-BF16 CPU the default job's
# fine-tuning took 105 s in bf16 against 80 s in fp32 (issue 13).
BF16_MIN_SPEEDUP = 1.2
AMP_MEASURE_STEPS = 3  # timed forward + backward passes per precision, after one warm-up each


@dataclass(frozen=True)
class AmpChoice:
    """The autocast dtype training runs under (None: fp32), and why; recorded in config.json."""

    dtype: torch.dtype | None
    reason: str
    step_ms: dict[str, float] | None = None  # measured ms per training step, when auto measured them
    to_measure: bool = False  # auto on a CPU with native bf16: fp32 unless bf16 measures faster

    @property
    def name(self) -> str:
        return "off" if self.dtype is None else str(self.dtype).removeprefix("torch.")


def resolve_amp(mode: str, device: torch.device) -> AmpChoice:
    """What ``--amp mode`` means on ``device``. On CUDA, auto picks bf16 where the GPU has it natively
    (fp16 otherwise). On a CPU, auto is fp32 unless the CPU has native bf16, and even then only after
    ``measure_amp`` finds bf16 faster: the choice comes back with ``to_measure``."""
    if mode == "off":
        return AmpChoice(None, "--amp off")
    if device.type == "cuda":
        if mode in ("fp16", "bf16"):
            return AmpChoice(torch.float16 if mode == "fp16" else torch.bfloat16, f"--amp {mode}")
        # Emulated bf16 (T4, V100) is counted as supported unless including_emulation=False.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return AmpChoice(torch.bfloat16, "auto: the GPU has native bf16")
        return AmpChoice(torch.float16, "auto: the GPU has no native bf16, so fp16 with loss scaling")
    if mode == "fp16":
        raise TlDeployError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off.")
    if mode == "bf16":
        return AmpChoice(torch.bfloat16, "--amp bf16")
    if not cpu_has_native_bf16():
        # Emulated bf16 on CPUs without native support (AVX512-BF16/AMX) is ~10x slower than fp32.
        return AmpChoice(None, "auto: fp32, the CPU has no native bf16")
    return AmpChoice(None, "auto: fp32 (bf16 not measured yet)", to_measure=True)


def measure_amp(choice: AmpChoice, time_step: Callable[[torch.dtype | None], float]) -> AmpChoice:
    """Settle an auto choice that needs a measurement: bf16 only when ``time_step(torch.bfloat16)``
    (ms per training step) beats ``time_step(None)`` (fp32) by ``BF16_MIN_SPEEDUP``."""
    if not choice.to_measure:
        return choice
    fp32_ms, bf16_ms = time_step(None), time_step(torch.bfloat16)
    step_ms = {"fp32": round(fp32_ms, 3), "bf16": round(bf16_ms, 3)}
    speedup = fp32_ms / bf16_ms if bf16_ms > 0 else 0.0
    if speedup >= BF16_MIN_SPEEDUP:
        return AmpChoice(torch.bfloat16, f"auto: bf16 measured {speedup:.2f}x faster than fp32 per training "
                                         f"step on this CPU ({bf16_ms:.1f} vs {fp32_ms:.1f} ms)", step_ms)
    return AmpChoice(None, f"auto: fp32, bf16 measured {speedup:.2f}x its speed per training step on this CPU "
                           f"({bf16_ms:.1f} vs {fp32_ms:.1f} ms; bf16 needs {BF16_MIN_SPEEDUP}x)", step_ms)


def time_train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    amp: torch.dtype | None, bn_eval: bool, steps: int = AMP_MEASURE_STEPS) -> float:
    """Median ms of one forward + backward of a copy of ``net`` (its weights and BatchNorm statistics
    stay untouched) on the batch ``(x, y)`` under ``amp``. The optimizer step is left out: it runs in
    fp32 under either precision."""
    probe = copy.deepcopy(net)
    set_train_mode(probe, bn_eval)
    times = []
    for i in range(steps + 1):  # the first pass lets oneDNN pick its kernels
        t0 = time.perf_counter()
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(probe(x).float(), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
        probe.zero_grad(set_to_none=True)
    return 1000 * float(np.median(times))


