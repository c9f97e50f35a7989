"""The discrepancy score and the modulation window of OGM, OGM-GE and OPM.

OGM and OGM-GE (:mod:`mmbalance.methods.ogm`) scale the dominant modality's encoder gradients,
OPM (:mod:`mmbalance.methods.opm`) drops its features; both measure, on every training batch, how
well each modality alone predicts the labels, and both act in the same window of epochs
(:class:`ModulationParams`).

Discrepancy score
-----------------
``s_m = sum_i softmax(z_m,i)[y_i]``: the batch *sum* of the true-class probability of modality
``m``'s own logits ``z_m``. The ratio of two such sums is the papers' ``rho`` (not a mean of
per-sample ratios). ``z_m`` is:

- **additive heads** (``late_sum``, ``concat_linear``): the modality's contribution plus the
  shared bias divided by the number of modalities ``M``, exactly the papers' ``W_m z_m + b/2``
  for two modalities;
- **other heads** (``concat_mlp``, ``film``, ``gated``, ``transformer``): the fusion head
  evaluated with every *other* modality's latent replaced by its batch mean. This keeps the
  head's own non-linear interactions, works for any head and any ``M`` without extra trainable
  probes, and removes exactly the per-sample information the other modalities carry, so what is
  left is what modality ``m`` tells the head about each sample. (Zeroing the others instead
  would feed the head inputs far outside its training distribution; auxiliary probes would add
  parameters and a second training signal.) For an additive head the rule differs from the
  contribution rule only by a per-class constant shared by all samples.

Scores are computed under ``torch.no_grad`` and, under DDP, their sums are all-reduced before any
ratio is taken, so every rank uses the same coefficient and the replicas stay identical.

More than two modalities
------------------------
``rho_m = s_m / reference_m`` with ``reference_m`` the mean (``ratio_to="mean"``, default) or the
largest (``"max"``) of the other modalities' scores. With two modalities both give the papers'
``rho`` and ``1/rho``. With ``"max"`` only the single best modality can have ``rho > 1``; with
``"mean"`` every modality above the average of the rest is slowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import Method, StepContext

RatioRule = Literal["mean", "max"]
_EPS = 1e-12


# --- the shared discrepancy score ---------------------------------------------------------------
def unimodal_score_logits(
    latents: Mapping[str, Tensor],
    fusion: object,
    contributions: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Each modality's own logits ``z_m`` for the discrepancy score (see the module docstring).

    ``contributions`` (from the forward pass of an additive head) avoids recomputing them. Runs
    without building a graph.
    """
    modalities = list(latents)
    with torch.no_grad():
        if contributions is None and getattr(fusion, "additive", False):
            contributions = fusion.contributions(latents)  # type: ignore[attr-defined]
        if contributions is not None:
            bias = getattr(fusion, "bias", None)
            share = 0.0 if bias is None else bias.detach() / len(modalities)
            return {m: contributions[m].detach() + share for m in modalities}
        if fusion is None:
            raise ConfigError("the discrepancy score needs the fusion head (StepContext.fusion)")
        means = {m: z.detach().mean(0, keepdim=True).expand_as(z) for m, z in latents.items()}
        out = {}
        for m in modalities:
            probe = {o: (latents[o].detach() if o == m else means[o]) for o in modalities}
            out[m] = fusion(probe, ()).logits  # type: ignore[operator]
        return out


def score_sums(logits: Mapping[str, Tensor], targets: Tensor) -> Tensor:
    """``(M,)`` batch sums of the true-class softmax probability, one per modality, no graph."""
    with torch.no_grad():
        idx = targets.long().unsqueeze(1)
        return torch.stack([z.float().softmax(-1).gather(1, idx).sum() for z in logits.values()])


def discrepancy_ratios(scores: Tensor, rule: RatioRule = "mean") -> Tensor:
    """``rho_m = s_m / (mean or max of the other scores)``; two modalities give ``(rho, 1/rho)``."""
    m = scores.shape[0]
    if m < 2:
        raise ConfigError(f"discrepancy ratios need at least 2 modalities, got {m}")
    if rule == "mean":
        reference = (scores.sum() - scores) / (m - 1)
    else:
        others = scores.unsqueeze(0).expand(m, m).clone()
        others.fill_diagonal_(-math.inf)
        reference = others.max(1).values
    return scores / reference.clamp_min(_EPS)


def batch_scores(
    latents: Mapping[str, Tensor],
    ctx: StepContext,
    contributions: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Score sums of one step, all-reduced over DDP ranks (identical on every rank)."""
    logits = unimodal_score_logits(latents, ctx.fusion, contributions)
    sums = score_sums(logits, ctx.targets)
    if ctx.world_size > 1:
        sums = ctx.all_reduce(sums)
    return sums


# --- options shared by the family ---------------------------------------------------------------
@dataclass
class ModulationParams:
    """Schedule and ratio options shared by OGM, OGM-GE and OPM.

    Modulation is on in epochs ``start <= epoch <= end`` (0-based, inclusive; ``end=None``: to the
    last epoch) that are also ``>= warmup_epochs`` (the journal code's warm-up: 6 epochs, i.e.
    nothing before epoch 6).

    Attributes:
        start: first epoch (0-based) in which the modulation acts.
        end: last epoch (0-based, inclusive) in which it acts; null: to the last epoch.
        warmup_epochs: epochs without modulation at the start of training.
        ratio_to: what a modality's score is divided by: the ``mean`` or the ``max`` of the
            other modalities' scores (the same with two modalities).
    """

    start: int = 0
    end: int | None = None
    warmup_epochs: int = 0
    ratio_to: RatioRule = "mean"

    def __post_init__(self) -> None:
        check(self.start >= 0, f"method.start must be >= 0, got {self.start}")
        check(
            self.end is None or self.end >= self.start,
            f"method.end must be >= method.start ({self.start}) or null, got {self.end}",
        )
        check(
            self.warmup_epochs >= 0, f"method.warmup_epochs must be >= 0, got {self.warmup_epochs}"
        )

    def active(self, epoch: int) -> bool:
        """Whether modulation applies in ``epoch``."""
        in_window = self.start <= epoch and (self.end is None or epoch <= self.end)
        return in_window and epoch >= self.warmup_epochs


def check_modulation_schedule(cls: type[Method], params: ModulationParams, epochs: int) -> None:
    """Refuse a run none of whose epochs modulates (a warm-up or window beyond the last epoch)."""
    if not any(params.active(e) for e in range(epochs)):
        first = max(params.start, params.warmup_epochs)
        cls.refuse_idle_schedule(
            f"in epoch {first} (0-based; start={params.start}, warmup_epochs="
            f"{params.warmup_epochs})",
            epochs,
            "lower method.warmup_epochs or method.start, or raise train.epochs",
        )
