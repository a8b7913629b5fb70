from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tl_deploy.preprocess import PreprocessSpec, denormalize, normalize


def reference_normalize(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    x = rgb.astype(np.float32) / np.float32(255.0)
    if spec.channel_order == "BGR":
        x = x[:, :, ::-1]
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_normalize_table_equals_float_maths(order: str) -> None:
    spec = dataclasses.replace(PreprocessSpec.for_size(32, 1.0), channel_order=order)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    out = normalize(rgb, spec)
    assert out.shape == (3, 32, 40) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(out, reference_normalize(rgb, spec))  # bit for bit


def test_denormalize_inverts_normalize() -> None:
    spec = PreprocessSpec.for_size(16, 1.0)
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(denormalize(normalize(rgb, spec), spec), rgb)
