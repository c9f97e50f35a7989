"""MBSD: modality-balanced self-distillation between the modalities' own predictions.

The method of BalanceBenchmark's objective group (Liu et al., 2023; BalanceBenchmark's
``MBSD_trainer.py``, formerly ``MSBD_trainer.py``). No paper text was available to us; the
formulas below come from BalanceBenchmark's code (GeWu-Lab/BalanceBenchmark @4c1482f), with its
faults fixed as listed.

Loss
----
``L = CE(fused) + sum_m CE(z_m) + mean over pairs (a, b) of L_ab``, with ``z_m`` modality ``m``'s
own logits (see :func:`~mmbalance.methods.ops.modality_logits.modality_logits`) and, per sample ``i`` of the batch,

- ``q_m,i = softmax(z_m,i)[y_i]``, the true-class confidence of modality ``m``;
- ``w_i = |q_a,i - q_b,i|`` if modality ``a`` or ``b`` predicts ``y_i`` (argmax), else 0;
- ``RS_i = (1/C) sum_c (z_a,i,c - z_b,i,c)^2`` (the two modalities' logits pulled together);
- ``KL_i = s_i * (log s_i - log u_i)`` with ``s_i = max(q_a,i, q_b,i)`` the stronger and
  ``u_i = min(q_a,i, q_b,i)`` the weaker confidence: the true-class term of ``KL(strong || weak)``,
  which distils the stronger modality's confidence into the weaker one (``s >= u``, so it is
  non-negative and zero only when the two agree);
- ``L_ab = (1/B) sum_i w_i * (KL_i + RS_i)``.

Any number of modalities: every unordered pair, averaged (BalanceBenchmark's two-modality branch
is the single pair; its three-modality branch averages the three pairs, as here).

Departures from BalanceBenchmark's code, and why
------------------------------------------------
- **The KL term.** The code calls ``F.kl_div(ps, pw)`` on the two confidences themselves, which
  computes ``pw * (log pw - ps)``: the stronger confidence enters as if it were a log-probability,
  and the weaker is the target, so the stronger is pulled towards the weaker. We compute what a
  distillation from the stronger to the weaker means: ``s * (log s - log u)``, the stronger one
  as the (detached) teacher.
- **Detachment.** In the code every quantity carries gradient, including the weight ``w`` and
  the stronger confidence. Here ``w`` is a per-sample weight and the stronger confidence is the
  teacher, both constants; the weaker confidence and both modalities' logits in ``RS`` train.
- **Logits or probabilities in RS.** The code's two-modality branch compares logits, its
  three-modality branch probabilities. We use logits for every ``M`` (the branch behind its
  published two-modality results).
- **Schedule.** The code's ``modulation_starts 0`` / ``modulation_ends 80`` cover every epoch
  of its 30-epoch runs, so the terms are always on here.

Classification only (confidences are softmax probabilities).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.methods.base import METHODS, Method, StepContext
from mmbalance.methods.ops.modality_logits import modality_logits
from mmbalance.models.output import ModelOutput

_TINY = 1e-12


def true_class_confidence(logits: Tensor, targets: Tensor) -> Tensor:
    """``softmax(logits)[i, y_i]`` for every row ``i``."""
    return logits.softmax(-1).gather(1, targets.long().unsqueeze(1)).squeeze(1)


def pair_weights(za: Tensor, zb: Tensor, targets: Tensor) -> Tensor:
    """``w_i = |q_a,i - q_b,i|`` where modality a or b predicts ``y_i``, else 0 (no graph)."""
    with torch.no_grad():
        qa, qb = true_class_confidence(za, targets), true_class_confidence(zb, targets)
        right = (za.argmax(-1) == targets) | (zb.argmax(-1) == targets)
        return torch.where(right, (qa - qb).abs(), torch.zeros_like(qa))


def pair_terms(za: Tensor, zb: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(w, KL, RS)`` of one modality pair (see the module docstring)."""
    w = pair_weights(za, zb, targets)
    qa, qb = true_class_confidence(za, targets), true_class_confidence(zb, targets)
    a_leads = (qa >= qb).detach()
    strong = torch.where(a_leads, qa, qb).detach().clamp_min(_TINY)
    weak = torch.where(a_leads, qb, qa).clamp_min(_TINY)
    kl = strong * (strong.log() - weak.log())
    rs = (za - zb).pow(2).mean(-1)
    return w, kl, rs


def self_distillation(logits: Mapping[str, Tensor], targets: Tensor) -> Tensor:
    """Mean over modality pairs of ``(1/B) sum_i w_i (KL_i + RS_i)``."""
    pairs = list(itertools.combinations(list(logits), 2))
    terms = []
    for a, b in pairs:
        w, kl, rs = pair_terms(logits[a], logits[b], targets)
        terms.append((w * (kl + rs)).mean())
    return torch.stack(terms).mean()


@METHODS.register("mbsd")
class MBSD(Method):
    """MBSD: CE + unimodal CEs + confidence-gap-weighted pairwise self-distillation.

    The pairwise terms match the modalities' logits and distil the stronger modality's
    true-class confidence into the weaker one (BalanceBenchmark's MBSD).

    Loss terms (``train_<term>`` in ``metrics.csv``): ``task``, ``uni_<m>``, ``distill`` (the
    pairwise term).
    """

    name = "mbsd"
    tasks = ("classification",)

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        logits = modality_logits(output, ctx.fusion)
        terms = {"task": ctx.task_loss(output.logits)}
        terms |= {f"uni_{m}": F.cross_entropy(z, ctx.targets) for m, z in logits.items()}
        terms["distill"] = self_distillation(logits, ctx.targets)
        return terms
