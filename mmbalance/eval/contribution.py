"""Shapley values of each modality for the fused model's accuracy (or another score).

The value of a coalition ``S`` of modalities is a score of the fused prediction when the
modalities outside ``S`` are *removed* from the latents the heads see. The score is the task's
accuracy by default (:mod:`mmbalance.eval.correctness`: class accuracy for classification, the
binary accuracy of the sign for regression) or any other of ``correctness.SCORES`` (``neg_mae``).
Removal:

* ``"permute"`` (default): each removed modality's latents are shuffled within the evaluation
  set with one fixed permutation (a seeded generator), which keeps their marginal distribution
  but breaks their link with the label and with the other modalities;
* ``"zero"``: each removed modality's latents are set to zero.

All ``2^M`` coalitions are evaluated (one forward pass of the heads each, on cached latents), and
the Shapley value of modality ``m`` is

    phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S)),

so that ``sum_m phi_m = v(all) - v(none)``.

**Imbalance degree** (in ``[0, 1]``)::

    imbalance = (max_m phi+_m - min_m phi+_m) / sum_m phi+_m,    phi+_m = max(phi_m, 0)

0 when every modality contributes equally, 1 when one modality carries all the (positive)
contribution; defined as 0 when no modality contributes positively.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mmbalance.eval.correctness import SCORES
from mmbalance.models.output import ModelOutput

Removal = Literal["permute", "zero"]
Heads = Callable[[dict[str, Tensor]], ModelOutput]
Predict = Callable[[ModelOutput], Tensor]


def coalitions(modalities: Sequence[str]) -> list[frozenset[str]]:
    """Every subset of ``modalities``, smallest first."""
    return [
        frozenset(c)
        for k in range(len(modalities) + 1)
        for c in itertools.combinations(modalities, k)
    ]


@torch.no_grad()
def coalition_predictions(
    heads: Heads,
    latents: Mapping[str, Tensor],
    removal: Removal = "permute",
    predict: Predict | None = None,
    seed: int = 0,
    batch_size: int = 4096,
) -> Iterator[tuple[frozenset[str], Tensor]]:
    """``(S, fused prediction on the CPU)`` for every coalition ``S`` of modalities, one at a
    time (so that only one coalition's predictions are held at once).

    ``heads`` maps latents to a :class:`ModelOutput` (e.g. ``MultimodalModel.heads``);
    ``predict`` picks the evaluated prediction from it (default ``output.logits``).
    """
    if removal not in ("permute", "zero"):
        raise ValueError(f"removal must be 'permute' or 'zero', got {removal!r}")
    predict = predict or (lambda out: out.logits)
    modalities = list(latents)
    n = next(iter(latents.values())).shape[0]
    generator = torch.Generator().manual_seed(seed)
    perms = {m: torch.randperm(n, generator=generator) for m in modalities}
    removed = {
        m: (z[perms[m].to(z.device)] if removal == "permute" else torch.zeros_like(z))
        for m, z in latents.items()
    }
    for coalition in coalitions(modalities):
        parts = []
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            z = {m: (latents[m] if m in coalition else removed[m])[part] for m in modalities}
            parts.append(predict(heads(z)).float().cpu())
        yield coalition, torch.cat(parts)


def coalition_scores(
    heads: Heads,
    latents: Mapping[str, Tensor],
    targets: Tensor,
    scores: Sequence[str] = ("accuracy",),
    removal: Removal = "permute",
    predict: Predict | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    task: str = "classification",
) -> dict[str, dict[frozenset[str], float]]:
    """``{score: {S: v(S)}}`` for several scores from one set of forward passes."""
    scorers = {name: SCORES.get(name) for name in scores}
    out: dict[str, dict[frozenset[str], float]] = {name: {} for name in scores}
    preds = coalition_predictions(heads, latents, removal, predict, seed, batch_size)
    for coalition, pred in preds:
        for name, scorer in scorers.items():
            out[name][coalition] = scorer(pred, targets, task)
    return out


def coalition_values(
    heads: Heads,
    latents: Mapping[str, Tensor],
    targets: Tensor,
    removal: Removal = "permute",
    predict: Predict | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    task: str = "classification",
    score: str = "accuracy",
) -> dict[frozenset[str], float]:
    """Score ``v(S)`` (default: the task's accuracy) of the fused prediction for every
    coalition ``S`` of modalities."""
    values = coalition_scores(
        heads, latents, targets, (score,), removal, predict, seed, batch_size, task
    )
    return values[score]


def shapley_from_values(
    values: Mapping[frozenset[str], float], modalities: Sequence[str]
) -> dict[str, float]:
    """Shapley value of each modality from the values of all coalitions."""
    big_m = len(modalities)
    phi = {}
    for m in modalities:
        total = 0.0
        for coalition in coalitions([o for o in modalities if o != m]):
            s = len(coalition)
            weight = math.factorial(s) * math.factorial(big_m - s - 1) / math.factorial(big_m)
            total += weight * (values[coalition | {m}] - values[coalition])
        phi[m] = total
    return phi


def imbalance_degree(shapley: Mapping[str, float]) -> float:
    """``(max - min) / sum`` of the positive parts of the Shapley values (see module doc)."""
    pos = [max(v, 0.0) for v in shapley.values()]
    total = sum(pos)
    return (max(pos) - min(pos)) / total if total > 0 else 0.0


def contributions_from_values(
    values: Mapping[frozenset[str], float], modalities: Sequence[str], removal: str, score: str
) -> dict[str, object]:
    """Shapley values, coalition values and imbalance degree, JSON-ready."""
    phi = shapley_from_values(values, modalities)
    return {
        "removal": removal,
        "score": score,
        "shapley": phi,
        "imbalance_degree": imbalance_degree(phi),
        "coalitions": {
            "+".join(m for m in modalities if m in c) or "none": v for c, v in values.items()
        },
    }


def shapley_contributions(
    heads: Heads,
    latents: Mapping[str, Tensor],
    targets: Tensor,
    removal: Removal = "permute",
    predict: Predict | None = None,
    seed: int = 0,
    task: str = "classification",
    score: str = "accuracy",
) -> dict[str, object]:
    """Shapley values of ``score``, coalition values and imbalance degree, JSON-ready."""
    values = coalition_values(
        heads, latents, targets, removal, predict, seed, task=task, score=score
    )
    return contributions_from_values(values, list(latents), removal, score)
