"""What this CPU offers the runtime, and the measured rule that lets ``auto`` pick OpenVINO.

The rule (docs/speed.md, "OpenVINO"), each branch measured with ``tl-deploy bench`` (2 threads,
interleaved rounds):

- an x86-64 CPU with AMX-BF16 (Intel Xeon, Sapphire Rapids and later): OpenVINO computing the FP32
  file in bf16. Three runs on an idle Intel Xeon with AMX: 1.10x-1.12x OpenVINO INT8 at batch 1 and
  1.19x-1.23x at batch 32 (p50), 25.9x-26.9x PyTorch eager at batch 1, with 99.8% top-1 agreement
  with PyTorch (``tl-deploy parity``).
- an x86-64 CPU with VNNI but no AMX (AMD EPYC, earlier Xeons): OpenVINO running the QDQ
  ``model.int8.onnx``, 1.85x-1.98x onnxruntime's CPU-tuned INT8 file at batch 1 (five runs on an AMD
  EPYC with AVX-512, VNNI and AVX512-BF16, where bf16 was no faster than INT8), and 1.70x-1.76x on the
  Xeon above.
- elsewhere (no VNNI, ARM: not measured) ``auto`` keeps onnxruntime.

Nothing here imports openvino: finding the package is enough to decide, so a plain ``load`` stays as
cheap as before. ``TL_DEPLOY_OPENVINO=0`` treats an installed OpenVINO as absent for ``auto`` and the
app's backend list (``backend='openvino'`` still runs it): the same choices as before OpenVINO on any
machine, e.g. for a test suite.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from collections.abc import Collection
from pathlib import Path

X86 = ("x86_64", "amd64")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # /proc/cpuinfo names of AVX-512 VNNI and AVX-VNNI
AMX_BF16_FLAG = "amx_bf16"  # Intel AMX tiles with bf16 matrix multiply
BF16_FLAGS = ("avx512_bf16", AMX_BF16_FLAG)  # native bf16 arithmetic: what OpenVINO's CPU plugin calls BF16
OPENVINO_ENV = "TL_DEPLOY_OPENVINO"  # "0": auto and the app leave OpenVINO out


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (found, not imported), unless
    ``TL_DEPLOY_OPENVINO=0`` leaves it out."""
    if os.environ.get(OPENVINO_ENV) == "0":
        return False
    return importlib.util.find_spec("openvino") is not None


def auto_choice(*, installed: bool, machine: str, flags: Collection[str]) -> tuple[str | None, str]:
    """The precision ``auto`` runs on OpenVINO on this machine (``bf16`` or ``int8``) and why, or
    (None, why not) (pure)."""
    if not installed:
        return None, f"OpenVINO is not installed (pip install 'tl_deploy[openvino]') or {OPENVINO_ENV}=0"
    if machine.lower() not in X86:
        return None, f"OpenVINO's speed-up was measured on x86-64 only, this CPU is {machine}"
    if AMX_BF16_FLAG in flags:
        return "bf16", "OpenVINO bf16: an x86 CPU with AMX, where it beat OpenVINO INT8 and onnxruntime INT8"
    if any(flag in flags for flag in VNNI_FLAGS):
        return "int8", "OpenVINO INT8: an x86 CPU with VNNI, where it beat onnxruntime INT8"
    return None, "this CPU has no VNNI, where OpenVINO's INT8 speed-up was not measured"


def openvino_auto_choice() -> tuple[str | None, str]:
    """``auto_choice`` for this machine."""
    return auto_choice(installed=openvino_installed(), machine=platform.machine(), flags=cpu_flags())


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), read from its flags."""
    return platform.machine().lower() in X86 and any(flag in cpu_flags() for flag in BF16_FLAGS)
