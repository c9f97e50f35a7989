"""OPM: on-the-fly prediction modulation (Wei, Hu, Du, Wen, TPAMI 2024).

The dominant modality's features are dropped per sample during training, with a probability that
grows with how far ahead it is. It uses OGM's discrepancy score
(:mod:`mmbalance.methods.ops.discrepancy`; computed on this batch's undropped latents, under DDP
all-reduced over ranks).

Per training batch, inside the modulation window (by default after the journal's 6 warm-up
epochs):

1. ``q_m = q_base * (1 + lam * tanh(relu(rho_m - 1)))`` where ``rho_m > 1``, else 0, clipped to
   ``[0, 1]``;
2. with probability ``p_exe`` the drop is executed (one draw per batch), otherwise the batch is
   unchanged;
3. masks ``keep_m,i ~ Bernoulli(1 - q_m)`` per sample and modality;
4. survivors are rescaled by the *global* ``1 / (1 - theta)`` with ``theta = sum_m d_m q_m /
   sum_m d_m`` (``d_m`` latent sizes), as the journal code does, so with ``q = (0.6, 0)`` the
   weak modality's features are scaled by ``1/0.7`` too;
5. samples whose modalities are all dropped are removed from the loss.

Nothing is dropped at evaluation (the trainer calls :meth:`OPM.transform_latents` only while
training). Logged per step: ``rho_<m>``, ``q_<m>`` (drop probabilities), ``opm_executed``,
``opm_dropped_<m>`` (the fraction of this batch's samples whose modality ``m`` was dropped: the
realised drop rate, 0 when the drop was not executed) and ``opm_kept_fraction``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.methods.base import METHODS, Method, StepContext, task_loss
from mmbalance.methods.ops.discrepancy import (
    ModulationParams,
    batch_scores,
    check_modulation_schedule,
    discrepancy_ratios,
)
from mmbalance.models.output import ModelOutput


def opm_drop_probabilities(ratios: Tensor, q_base: float, lam: float) -> Tensor:
    """``q_m = clip(q_base (1 + lam tanh(relu(rho_m - 1))), 0, 1)`` if ``rho_m > 1``, else 0."""
    r = torch.tanh(torch.relu(ratios - 1))
    q = torch.where(r > 0, q_base * (1 + lam * r), torch.zeros_like(r))
    return q.clamp(0.0, 1.0)


def drop_latents(
    latents: Mapping[str, Tensor],
    q: Mapping[str, float | Tensor],
    generator: torch.Generator | None = None,  # a CPU generator; None: the global one
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """Drop each sample's latent of modality ``m`` with probability ``q[m]``, rescale survivors by
    the global ``1/(1 - theta)``, and return the new latents, the mask of samples that keep at
    least one modality, and the fraction of samples dropped per modality (0-dim tensors)."""
    modalities = list(latents)
    first = latents[modalities[0]]
    n, device = first.shape[0], first.device
    dims = torch.tensor([float(latents[m].shape[1]) for m in modalities])
    qs = torch.tensor([float(q[m]) for m in modalities])
    theta = float((dims * qs).sum() / dims.sum())
    scale = 1.0 / (1.0 - theta) if theta < 1.0 else 0.0
    out: dict[str, Tensor] = {}
    dropped: dict[str, Tensor] = {}
    kept_any = torch.zeros(n, dtype=torch.bool, device=device)
    for m, qm in zip(modalities, qs.tolist(), strict=True):
        z = latents[m]
        if qm <= 0.0:
            out[m] = z * scale if scale != 1.0 else z
            kept_any.fill_(True)
            dropped[m] = torch.zeros(())
            continue
        keep = torch.rand(n, generator=generator) >= qm  # CPU draw: reproducible
        dropped[m] = 1.0 - keep.float().mean()
        keep = keep.to(device)
        kept_any |= keep
        out[m] = z * (keep.to(z.dtype) * scale).unsqueeze(1)
    return out, kept_any, dropped


@dataclass
class OPMParams(ModulationParams):
    """OPM options (journal code defaults), with the schedule options of ``ModulationParams``.

    Attributes:
        warmup_epochs: epochs without modulation at the start of training (journal code: 6).
        q_base: base probability of dropping a dominant modality's features.
        lam: how fast the drop probability grows with the discrepancy ratio.
        p_exe: probability that a batch is modulated at all (one draw per batch).
    """

    warmup_epochs: int = 6
    q_base: float = 0.5
    lam: float = 0.5
    p_exe: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.q_base <= 1, f"method.q_base must be in [0, 1], got {self.q_base}")
        check(self.lam >= 0, f"method.lam must be >= 0, got {self.lam}")
        check(0 <= self.p_exe <= 1, f"method.p_exe must be in [0, 1], got {self.p_exe}")


@METHODS.register("opm")
class OPM(Method):
    """On-the-fly prediction modulation: drop the dominant modality's features per sample."""

    name = "opm"
    tasks = ("classification",)
    Params = OPMParams
    search_space = ("method.q_base", (0.3, 0.5, 0.7))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        check_modulation_schedule(cls, params, epochs)

    def drop_probabilities(self, latents: Mapping[str, Tensor], ctx: StepContext) -> Tensor:
        """``(M,)`` drop probabilities of this batch (scores all-reduced under DDP); logs them."""
        scores = batch_scores(latents, ctx)
        rho = discrepancy_ratios(scores, self.params.ratio_to)
        q = opm_drop_probabilities(rho, self.params.q_base, self.params.lam)
        for i, m in enumerate(latents):
            ctx.log(f"rho_{m}", rho[i])
            ctx.log(f"q_{m}", q[i])
        return q

    def transform_latents(self, latents: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if not self.params.active(ctx.epoch):
            return latents
        q = self.drop_probabilities(latents, ctx)
        executed = bool(torch.rand(()) < self.params.p_exe)
        ctx.log("opm_executed", float(executed))
        if not executed or not bool((q > 0).any()):
            ctx.log("opm_kept_fraction", 1.0)
            for m in latents:
                ctx.log(f"opm_dropped_{m}", 0.0)
            return latents
        new, keep, dropped = drop_latents(latents, {m: q[i] for i, m in enumerate(latents)})
        ctx.log("opm_kept_fraction", keep.float().mean())
        for m, fraction in dropped.items():
            ctx.log(f"opm_dropped_{m}", fraction)
        if not bool(keep.all()):
            ctx.scratch["keep"] = keep  # the samples this step's loss counts (losses)
        return new

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        keep = ctx.scratch.get("keep")
        if keep is None:
            return {"task": ctx.task_loss(output.logits)}
        if not bool(keep.any()):  # every sample lost every modality: no signal, zero loss
            return {"task": output.logits.sum() * 0.0}
        logits, targets = output.logits[keep], ctx.targets[keep]
        return {"task": task_loss(logits, targets, ctx.task, ctx.regression_loss)}
