"""CML: calibrated multimodal learning (Ma et al., ICML 2023, "Calibrating Multimodal Learning").

A prediction made from fewer modalities should not be more confident than one made from more.
CML removes modalities one by one, in a random order, and penalises every step of that chain at
which the confidence (the top softmax probability) rises.

Loss (per step, ``M`` modalities, removal order ``r_1, ..., r_{M-1}`` drawn once per epoch)::

    z^(0) = fused logits,  z^(k) = the prediction without r_1..r_k      (k = 1..M-1)
    conf^(k) = max_c softmax(z^(k))_c                                   (per sample)
    L_conf = sum_k max(0, sum_i (conf^(k)_i - conf^(k-1)_i))            (hinge on the batch sum)
    L = (1/M) sum_{k=0}^{M-1} CE(z^(k)) + lam * L_conf

The partial predictions ``z^(k)``:

- **additive heads** (``late_sum``, ``concat_linear``): the fused logits minus the removed
  modalities' contributions ``W_m h_m``, the shared bias kept (BalanceBenchmark's
  ``out_s - unimodal_m + b/M`` with ``unimodal_m = W_m h_m + b/M``). No extra head evaluation.
- **other heads**: the head re-run with the removed modalities' latents set to zero. For an
  additive head that is exactly the subtraction above (a zero latent contributes nothing), which
  is why zeros, rather than a batch mean, stand in for a removed modality. One extra head
  evaluation per partial prediction (``M - 1`` per step); no encoder runs again.

Sources and choices
-------------------
- The formulas follow BalanceBenchmark's ``CML_trainer.py`` (GeWu-Lab/BalanceBenchmark
  @4c1482f): a chain of nested removals in an order shuffled once per epoch, the hinge on the
  batch sum of confidence differences between consecutive sets, ``mean CE + lam * L_conf`` with
  ``lam 0.1``. The order here is drawn from ``(seed, epoch)``, so a resumed run removes the
  modalities in the order an uninterrupted run would.
- The authors' release (QingyangZhang/CML, for other models) puts the hinge on each sample,
  ``sum_i max(0, conf^(k)_i - conf^(k-1)_i)``, with two sign masks and a margin; the paper's
  constraint is also stated per sample. ``hinge="sample"`` gives that per-sample form (without the
  release's sign masks and margin); the default ``"batch"`` is BalanceBenchmark's form, the one
  its CREMA-D number (69.18) comes from.
- BalanceBenchmark's modulation window (epochs 0 to 80) spans its whole 30-epoch runs, so the
  terms are always on here.

Classification only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, Method, StepContext
from mmbalance.models.output import ModelOutput

Hinge = Literal["batch", "sample"]


def removal_order(modalities: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The order in which modalities are removed during ``epoch``: a permutation drawn from
    ``(seed, epoch)``; the first ``M - 1`` entries are removed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(modalities), generator=gen).tolist()
    return [modalities[i] for i in perm]


def partial_logits(
    output: ModelOutput, removed: Sequence[str], fusion: object | None = None
) -> Tensor:
    """The prediction without the ``removed`` modalities (see the module docstring)."""
    if output.contributions is not None:
        return output.logits - torch.stack([output.contributions[m] for m in removed]).sum(0)
    if fusion is None:
        raise ConfigError("cml on a non-additive fusion head needs the head (StepContext.fusion)")
    latents = {m: torch.zeros_like(z) if m in removed else z for m, z in output.latents.items()}
    return fusion(latents, ()).logits  # type: ignore[operator]


def confidence(logits: Tensor) -> Tensor:
    """The top softmax probability of every row, with gradient."""
    return logits.softmax(-1).max(-1).values


def confidence_violation(conf_fewer: Tensor, conf_more: Tensor, hinge: Hinge = "batch") -> Tensor:
    """``max(0, sum_i (fewer_i - more_i))`` (``batch``) or ``sum_i max(0, fewer_i - more_i)``
    (``sample``): how much removing modalities raised the confidence."""
    if hinge == "batch":
        return (conf_fewer - conf_more).sum().clamp_min(0.0)
    return (conf_fewer - conf_more).clamp_min(0.0).sum()


def chain_losses(
    output: ModelOutput,
    targets: Tensor,
    order: Sequence[str],
    fusion: object | None = None,
    hinge: Hinge = "batch",
) -> tuple[list[Tensor], Tensor]:
    """The cross-entropies of the fused and of the ``M - 1`` partial predictions along the
    removal ``order``, and ``L_conf`` summed over the chain's consecutive steps."""
    previous = output.logits
    ces = [F.cross_entropy(previous, targets)]
    violation = previous.new_zeros(())
    for k in range(1, len(order)):
        current = partial_logits(output, order[:k], fusion)
        ces.append(F.cross_entropy(current, targets))
        violation = violation + confidence_violation(
            confidence(current), confidence(previous), hinge
        )
        previous = current
    return ces, violation


@dataclass
class CMLParams:
    """CML options.

    Attributes:
        lam: weight of the confidence constraint.
        hinge: the hinge on the batch sum (BalanceBenchmark) or per sample (the authors'
            release).
        seed: seeds the per-epoch order in which modalities are removed.
    """

    lam: float = 0.1
    hinge: Hinge = "batch"
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.lam >= 0, f"method.lam must be >= 0, got {self.lam}")


@METHODS.register("cml")
class CML(Method):
    """CML: fused and partial-prediction CE plus a penalty on confidence rising as modalities go.

    Loss terms (``train_<term>``): ``task`` (the fused CE over ``M``), ``partial`` (the partial
    CEs over ``M``), ``conf`` (``lam * L_conf``). Logged per step: ``conf_violation`` (``L_conf``).
    """

    name = "cml"
    tasks = ("classification",)
    Params = CMLParams
    search_space = ("method.lam", (0.03, 0.1, 0.3))

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        order = removal_order(output.modalities, self.params.seed, ctx.epoch)
        ces, violation = chain_losses(output, ctx.targets, order, ctx.fusion, self.params.hinge)
        ctx.log("conf_violation", violation)
        m = len(ces)
        return {
            "task": ces[0] / m,
            "partial": torch.stack(ces[1:]).sum() / m,
            "conf": self.params.lam * violation,
        }
