"""When is a prediction *right*? One answer per task, shared by every analysis.

Shapley contributions, error analysis, probes and the per-epoch curves all need a per-sample
"right or wrong" and an accuracy-like score. Keeping that in one registry lets the analyses stay
task-agnostic:

* ``classification``: a prediction (logits ``(N, C)`` or class indices ``(N,)``) is right when
  its class is the target; every sample counts.
* ``regression``: a prediction (``(N, 1)`` or ``(N,)``) is right when its sign agrees with the
  target's; samples whose target is exactly 0 (MOSI's neutral ones) are not scored. This is the
  CMU-MOSI "Acc-2" (non-zero) convention of :func:`~mmbalance.eval.metrics.regression_metrics`,
  so the fused score of the analyses equals the run's ``binary_accuracy``.

Scores for Shapley values are a second registry (``SCORES``): ``accuracy`` (the task's
right/wrong rate above, the default) and ``neg_mae`` (minus the mean absolute error, regression).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mmbalance.registry import Registry


@dataclass(frozen=True)
class Outcome:
    """How one task turns predictions and targets into labels to compare.

    Attributes:
        description: what "right" means, for reports.
        labels: predictions -> labels ``(N,)``.
        target_labels: targets -> labels ``(N,)``.
        scored: targets -> boolean mask of the samples that are scored.
    """

    description: str
    labels: Callable[[Tensor], Tensor]
    target_labels: Callable[[Tensor], Tensor]
    scored: Callable[[Tensor], Tensor]

    def right(self, pred: Tensor, targets: Tensor) -> Tensor:
        """Boolean ``(N,)``: whether each prediction is right (meaningless where not scored)."""
        return self.labels(pred).cpu() == self.target_labels(targets).cpu()

    def accuracy(self, pred: Tensor, targets: Tensor) -> float:
        """Share of the scored samples whose prediction is right (0 when none is scored)."""
        mask = self.scored(targets).cpu()
        return float(self.right(pred, targets)[mask].double().mean()) if mask.any() else 0.0


def _first_column(values: Tensor) -> Tensor:
    return values.reshape(values.shape[0], -1)[:, 0]


def _class_labels(pred: Tensor) -> Tensor:
    return pred.argmax(-1) if pred.ndim == 2 else pred.long()


OUTCOMES: Registry[Outcome] = Registry("task")
OUTCOMES.register("classification")(
    Outcome(
        description="class of the prediction equals the target",
        labels=_class_labels,
        target_labels=lambda t: t.reshape(-1).long(),
        scored=lambda t: torch.ones(t.shape[0], dtype=torch.bool),
    )
)
OUTCOMES.register("regression")(
    Outcome(
        description="sign of the prediction agrees with the target's (zero targets not scored)",
        labels=lambda p: _first_column(p) > 0,
        target_labels=lambda t: t.reshape(-1) > 0,
        scored=lambda t: t.reshape(-1) != 0,
    )
)

#: A score of predictions against targets, larger is better: ``score(pred, targets, task)``.
Score = Callable[[Tensor, Tensor, str], float]


def _accuracy(pred: Tensor, targets: Tensor, task: str) -> float:
    return OUTCOMES.get(task).accuracy(pred, targets)


def _neg_mae(pred: Tensor, targets: Tensor, task: str) -> float:
    diff = _first_column(pred).double().cpu() - targets.reshape(-1).double().cpu()
    return -float(diff.abs().mean()) if diff.numel() else 0.0


SCORES: Registry[Score] = Registry("score")
SCORES.register("accuracy")(_accuracy)
SCORES.register("neg_mae")(_neg_mae)
