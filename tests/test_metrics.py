"""Metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from mmbalance.eval.metrics import classification_metrics, per_class_accuracy, regression_metrics


def test_classification_metrics_by_hand() -> None:
    targets = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    m = classification_metrics(logits, targets, 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # F1: class 0: p=1/2 r=1/2 -> 1/2; class 1: p=2/3 r=1 -> 4/5; class 2: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert per_class_accuracy(logits, targets, 3) == pytest.approx([0.5, 1.0, 0.0])


def test_regression_metrics_by_hand() -> None:
    pred = torch.tensor([1.0, -1.0, 2.0, 0.5])
    target = torch.tensor([2.0, -1.0, -1.0, 0.0])
    m = regression_metrics(pred, target)
    assert m["mae"] == pytest.approx((1 + 0 + 3 + 0.5) / 4)
    # sign agreement on non-zero targets: (+,+) yes, (-,-) yes, (+,-) no
    assert m["binary_accuracy"] == pytest.approx(2 / 3)
    expected = torch.corrcoef(torch.stack([pred, target]))[0, 1].item()
    assert m["pearson"] == pytest.approx(expected, abs=1e-6)
