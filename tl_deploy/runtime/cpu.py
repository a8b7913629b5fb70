"""What this CPU offers the runtime, and the measured rule that lets ``auto`` pick OpenVINO.

The rule (docs/speed.md, "OpenVINO"): on an x86-64 CPU with VNNI (the INT8 dot-product
instructions), OpenVINO running the QDQ ``model.int8.onnx`` was 1.36x-1.54x faster than onnxruntime's
CPU-tuned INT8 file at batch 1 and 1.40x-1.67x at batch 32 (``tl-deploy bench``, two runs on an AMD
EPYC, 2 threads; 1.90x-1.94x at batch 1 once one-image calls ran a graph compiled for batch 1), at
the same parity (``tl-deploy parity``: 99.75% agreement). Where that was not measured (no VNNI,
ARM) ``auto`` keeps onnxruntime. Nothing here imports openvino: finding the package is enough to
decide, so a plain ``load`` stays as cheap as before. ``TL_DEPLOY_OPENVINO=0`` treats an installed
OpenVINO as absent for ``auto`` and the app's backend list (``backend='openvino'`` still runs it):
the same choices as before OpenVINO on any machine, e.g. for a test suite.
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


def auto_problem(*, installed: bool, machine: str, flags: Collection[str]) -> str | None:
    """Why ``auto`` does not pick OpenVINO INT8 on this machine, or None when it does (pure)."""
    if not installed:
        return f"OpenVINO is not installed (pip install 'tl_deploy[openvino]') or {OPENVINO_ENV}=0"
    if machine.lower() not in X86:
        return f"OpenVINO's INT8 speed-up was measured on x86-64 only, this CPU is {machine}"
    if not any(flag in flags for flag in VNNI_FLAGS):
        return "this CPU has no VNNI, where OpenVINO's INT8 speed-up was not measured"
    return None


def openvino_auto_problem() -> str | None:
    """``auto_problem`` for this machine."""
    return auto_problem(installed=openvino_installed(), machine=platform.machine(), flags=cpu_flags())
