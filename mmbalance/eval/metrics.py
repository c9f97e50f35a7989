"""Metrics for classification and regression predictions.

Classification: accuracy, macro-F1 (the mean F1 over the classes present in the targets or the
predictions, as scikit-learn's ``f1_score(average="macro")``), balanced accuracy (the mean recall
over the classes present in the targets, as scikit-learn's ``balanced_accuracy_score``) and the
expected calibration error of the softmax of the prediction (:func:`expected_calibration_error`).
Regression: MAE, Pearson correlation and the binary accuracy of the sign.
"""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """``cm[t, p]``: how many samples of true class ``t`` were predicted as ``p``."""
    idx = targets.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


#: Equal-width confidence bins of the expected calibration error (Guo et al., ICML 2017).
ECE_BINS = 15


def expected_calibration_error(logits: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the softmax of ``logits`` (Guo et al., ICML 2017).

    Each sample's confidence is its largest softmax probability; samples fall into ``bins``
    equal-width bins ``(k/bins, (k+1)/bins]`` of confidence (a confidence of exactly 0 joins the
    first); ECE is ``sum_k |B_k| / N * |accuracy(B_k) - mean confidence(B_k)|``. Log-probabilities
    (an ensemble averaging probabilities) have the same softmax as the probabilities.
    """
    probs = logits.detach().double().softmax(-1)
    confidence, pred = probs.max(-1)
    right = (pred == targets.reshape(-1).long()).double()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    conf_sum = torch.bincount(which, weights=confidence, minlength=bins)
    right_sum = torch.bincount(which, weights=right, minlength=bins)
    return float((right_sum - conf_sum).abs().sum() / max(int(targets.numel()), 1))


def classification_metrics(logits: Tensor, targets: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 (classes absent from both targets and predictions are skipped),
    balanced accuracy (classes absent from the targets are skipped) and the expected
    calibration error (``ece``, :data:`ECE_BINS` bins)."""
    pred = logits.argmax(-1)
    cm = confusion_matrix(pred, targets, num_classes).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp_min(1), torch.zeros_like(tp))
    has_samples = support > 0
    recall = tp[has_samples] / support[has_samples]
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall.mean()) if has_samples.any() else 0.0,
        "ece": expected_calibration_error(logits, targets),
    }


def per_class_accuracy(logits: Tensor, targets: Tensor, num_classes: int) -> list[float]:
    """Recall of every class (NaN for classes without samples)."""
    cm = confusion_matrix(logits.argmax(-1), targets, num_classes).double()
    return (cm.diag() / cm.sum(1)).tolist()


def regression_metrics(pred: Tensor, targets: Tensor) -> dict[str, float]:
    """MAE, Pearson correlation and binary accuracy (sign agreement on non-zero targets, the
    CMU-MOSI "Acc-2" convention)."""
    pred = pred.reshape(-1).double()
    targets = targets.reshape(-1).double()
    mae = (pred - targets).abs().mean()
    pc, tc = pred - pred.mean(), targets - targets.mean()
    denom = pc.norm() * tc.norm()
    corr = (pc @ tc) / denom if denom > 0 else torch.tensor(0.0)
    nonzero = targets != 0
    binary = ((pred[nonzero] > 0) == (targets[nonzero] > 0)).double().mean() if nonzero.any() else 0
    return {"mae": float(mae), "pearson": float(corr), "binary_accuracy": float(binary)}


def task_metrics(logits: Tensor, targets: Tensor, task: str, num_outputs: int) -> dict[str, float]:
    """The metrics of ``task`` for predictions ``logits``."""
    if task == "classification":
        return classification_metrics(logits, targets, num_outputs)
    return regression_metrics(logits[:, 0], targets)


def selection_key(metrics: dict[str, float], task: str) -> tuple[float, float]:
    """Larger is better: (primary validation metric, minus loss) used for model selection."""
    primary = metrics["accuracy"] if task == "classification" else -metrics["mae"]
    return primary, -metrics.get("loss", 0.0)
