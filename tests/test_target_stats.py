"""Guard rails: label-free statistics of target predictions and the collapse verdict."""

from __future__ import annotations

import math

import pytest
import torch

from tl_deploy.train.target_stats import collapse_reason, target_stats


def test_balanced_confident_predictions() -> None:
    logits = 20.0 * torch.eye(4).repeat(5, 1)  # (20, 4): each class 5 times, certain
    stats = target_stats(logits)
    assert stats.images == 20 and stats.mean_entropy < 1e-6
    assert stats.effective_classes == pytest.approx(4.0)
    assert stats.class_fractions == [0.25] * 4 and stats.drift is None and stats.agreement is None
    assert collapse_reason(stats, num_classes=4) is None


def test_uniform_predictions_have_entropy_one() -> None:
    assert target_stats(torch.zeros(7, 5)).mean_entropy == pytest.approx(1.0)


def test_collapse_is_detected_against_the_reference() -> None:
    reference = target_stats(20.0 * torch.eye(10).repeat(3, 1))  # 10 effective classes
    collapsed_logits = torch.zeros(30, 10)
    collapsed_logits[:, 3] = 5.0  # every image -> class 3
    stats = target_stats(collapsed_logits, reference=20.0 * torch.eye(10).repeat(3, 1))
    assert stats.effective_classes == pytest.approx(1.0)
    assert stats.agreement == pytest.approx(0.1) and stats.drift == pytest.approx(0.9)
    reason = collapse_reason(stats, reference)
    assert reason is not None and "collapsed to 1.0 effective classes" in reason and "class 3" in reason
    assert collapse_reason(reference, reference) is None
    half = target_stats(20.0 * torch.eye(10)[:6].repeat(5, 1))  # 6 of 10 classes: not a collapse
    assert math.isclose(half.effective_classes, 6.0) and collapse_reason(half, reference) is None


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="needs"):
        target_stats(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="do not match"):
        target_stats(torch.zeros(4, 3), reference=torch.zeros(5, 3))


def test_to_dict_names_the_classes() -> None:
    d = target_stats(20.0 * torch.eye(2).repeat(2, 1), reference=20.0 * torch.eye(2).repeat(2, 1)).to_dict(["a", "b"])
    assert d["class_fractions"] == {"a": 0.5, "b": 0.5} and d["agreement"] == 1.0 and d["drift"] == 0.0
