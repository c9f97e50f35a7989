"""Error analysis: which unimodal predictors are right, and what the fused model does then.

Each sample is put in the group named by the set of modalities whose unimodal predictor is right
(``"none"``, ``"m1"``, ``"m2"``, ``"m1+m2"``, ...). Two rates summarise how the fused model uses
its modalities:

* **routing rate**: P(fused right | at least one unimodal predictor right), i.e. whether fusion
  follows the modality that knows the answer;
* **synergy rate**: P(fused right | every unimodal predictor wrong), i.e. whether fusion solves
  samples that no modality solves alone.

A rate is ``None`` when its condition never occurs.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def group_name(modalities: tuple[str, ...]) -> str:
    return "+".join(modalities) or "none"


def error_analysis(
    fused_pred: Tensor, unimodal_pred: Mapping[str, Tensor], targets: Tensor
) -> dict[str, Any]:
    """Groups by correct unimodal predictors, fused accuracy per group, routing and synergy.

    All arguments hold class indices of shape ``(N,)``; ``unimodal_pred`` is keyed by modality.
    """
    targets = targets.reshape(-1).cpu()
    fused_right = fused_pred.reshape(-1).cpu() == targets
    modalities = tuple(unimodal_pred)
    right = {m: unimodal_pred[m].reshape(-1).cpu() == targets for m in modalities}
    n = int(targets.shape[0])
    groups: dict[str, dict[str, Any]] = {}
    for k in range(len(modalities) + 1):
        for subset in itertools.combinations(modalities, k):
            mask = torch.ones(n, dtype=torch.bool)
            for m in modalities:
                mask &= right[m] if m in subset else ~right[m]
            count = int(mask.sum())
            correct = int((fused_right & mask).sum())
            groups[group_name(subset)] = {
                "count": count,
                "fraction": count / n if n else 0.0,
                "fused_correct": correct,
                "fused_accuracy": correct / count if count else None,
            }
    any_right = torch.zeros(n, dtype=torch.bool)
    for m in modalities:
        any_right |= right[m]

    def rate(mask: Tensor) -> float | None:
        total = int(mask.sum())
        return int((fused_right & mask).sum()) / total if total else None

    return {
        "n": n,
        "groups": groups,
        "routing_rate": rate(any_right),
        "synergy_rate": rate(~any_right),
        "fused_accuracy": float(fused_right.double().mean()) if n else 0.0,
    }
