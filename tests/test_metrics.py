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


def _fixed_predictions() -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits of 7 classes for 300 samples: class 6 never occurs in the targets (but is
    predicted), and the logits are sharpened so that the confidences spread over the bins."""
    gen = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 6, (300,), generator=gen)
    logits = 2.5 * torch.randn(300, 7, generator=gen)
    logits[torch.arange(300), targets] += 1.5  # better than chance, far from perfect
    logits[:, 5] -= 4.0  # class 5 is rarely predicted
    return logits, targets


def test_macro_f1_and_balanced_accuracy_equal_scikit_learn() -> None:
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score

    logits, targets = _fixed_predictions()
    pred = logits.argmax(-1).numpy()
    y = targets.numpy()
    assert 6 in set(pred) and 6 not in set(y)  # a predicted class without samples
    m = classification_metrics(logits, targets, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the class without samples
        balanced = balanced_accuracy_score(y, pred)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)
    assert m["balanced_accuracy"] != pytest.approx(m["accuracy"], abs=1e-3)  # they can differ


def test_expected_calibration_error_follows_its_definition() -> None:
    from mmbalance.eval.metrics import ECE_BINS, expected_calibration_error

    logits, targets = _fixed_predictions()
    probs = torch.softmax(logits.double(), -1)
    ece, n = 0.0, len(targets)
    for k in range(15):
        lo, hi = k / 15, (k + 1) / 15
        members = [
            i for i in range(n) if lo < probs[i].max() <= hi or (k == 0 and probs[i].max() == 0)
        ]
        if not members:
            continue
        accuracy = sum(int(probs[i].argmax() == targets[i]) for i in members) / len(members)
        confidence = sum(float(probs[i].max()) for i in members) / len(members)
        ece += len(members) / n * abs(accuracy - confidence)
    assert ECE_BINS == 15
    assert ece > 0.02  # miscalibrated enough for the comparison to mean something
    assert expected_calibration_error(logits, targets) == pytest.approx(ece, abs=1e-12)
    assert classification_metrics(logits, targets, 7)["ece"] == pytest.approx(ece, abs=1e-12)
    # log-probabilities (an ensemble of probabilities) are scored like the probabilities
    log_probs = torch.log_softmax(logits, -1)
    assert expected_calibration_error(log_probs, targets) == pytest.approx(ece, abs=1e-6)
