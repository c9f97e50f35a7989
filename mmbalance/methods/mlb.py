"""MLB: Multi-Loss Balanced training (Kontras et al., BMVC 2024).

Loss: the fused task loss plus one unimodal-head loss per modality (``lam_uni``, 1 in every
official config), as in ``multiloss``. On top, every step, each modality's gradient is scaled by a
coefficient from how confident the unimodal heads are on the batch:

- ``s_m = mean_b softmax(u_m)_b[y_b]``: batch mean of the true-class probability of modality
  ``m``'s unimodal head ``u_m`` (no history, no EMA);
- ``r_m = mean_{j != m} s_j / s_m``: ``r_m > 1`` when ``m`` is the weaker modality (for two
  modalities ``r_0 = s_1 / s_0`` and ``r_1 = 1 / r_0``);
- ``k_m = 1 + tanh(alpha (r_m - 1))`` in ``(0, 2)``: the weak modality is accelerated, the strong
  one slowed. With ``beta_max`` set (the README's form), the weak side is capped at ``beta_max``:
  ``k_m = 1 + (beta_max - 1) tanh(alpha (r_m - 1))`` where ``r_m > 1``, unchanged elsewhere.
  ``beta_max = 1`` never accelerates, ``beta_max < 1`` slows the weak modality too.

When both heads fit the batch (``s_m -> 1``) every ``r_m -> 1`` and ``k_m -> 1``: the paper's
"phases out at convergence" is this, not a schedule.

Where ``k_m`` applies (as the official ``Bias_Infusion_MLB._equalize_gradients``: every parameter
whose name holds ``enc_m``, i.e. the encoder and its unimodal head, and ``fc_m_lin.weight``, the
modality's block of the linear fusion head; the fusion bias is not scaled): the gradient of
modality ``m``'s encoder, of its unimodal head and, for additive fusion heads, of the head's
parameters that act on ``m`` alone (the block of ``late_sum``/``concat_linear``/``cosine`` weights
that produces ``m``'s contribution). Both the fused and the unimodal loss's gradients are scaled,
because the official code scales after backward.

How: instead of rewriting ``.grad`` of named parameters after backward (which needs each head's
parameter layout), the coefficient scales the gradient where it enters modality ``m``'s part of
the graph: a tensor hook multiplies the gradient reaching the unimodal logits ``u_m`` by ``k_m``
(the unimodal head's gradient and, through it, the encoder's unimodal gradient), and one on the
additive head's contribution ``c_m`` (which feeds only the fused logits) does the same for ``m``'s
block of the fusion head and the encoder's fused gradient. Every scaled parameter gets exactly
``k_m`` times its multi-loss gradient, for any additive head, with no extra pass and no extra
forward operation. Non-additive heads (``concat_mlp``, ``film``, ``gated``, ``transformer``) have
no block per modality; there the fusion head is re-run once on ``scale_grad(z_m, k_m)``
(:mod:`mmbalance.methods.ops.gradients`: identity forward, gradient times ``k_m``) so that the
encoder's fused gradient is scaled while the head's own parameters are not (one extra head
forward, no encoder re-run). The official code @68ad48d cannot run non-additive heads at all (its ``Base_Model`` then
reaches an undefined ``fc_0_lin``).

More than two modalities: ``r_m`` against the mean of the others, as the official ``MLB_3d``; its
``beta_max`` form is honoured here for any ``M`` (``MLB_3d`` compares the mode with the integer 2
while its command line sets the string ``"2"``, so it silently ignores ``beta_max``).

Classification only (the official ``MLB_Reg`` for regression uses MSE scores and imports a
missing ``torch.functional.mse_loss``). Under DDP the batch means are averaged over ranks so every
rank uses the same coefficients.

Official settings (``kkontras/MLB`` ``run.sh`` @68ad48d, Adam with coupled L2, batch 32, no
unimodal pre-training): CREMA-D ResNet ``alpha 0.5, beta_max 10``, lr 1e-3, wd 1e-4; CREMA-D
Conformer ``alpha 5`` (default form); AVE ResNet ``alpha 2, beta_max 1``; UCF ``alpha 2,
beta_max 0.5``. Scaling a whole encoder's gradient by a slowly varying factor is largely undone by
Adam (``scales_gradients``); ``configs/mlb/*_sgd.yaml`` give SGD variants.

Logged per step: ``score_<m>``, ``ratio_<m>``, ``coeff_<m>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, Method, StepContext
from mmbalance.methods.ops.gradients import multiply_by, scale_grad
from mmbalance.models.output import ModelOutput


def confidence_scores(logits: Mapping[str, Tensor], targets: Tensor) -> Tensor:
    """``(M,)`` batch means of the true-class softmax probability, one per modality, no graph."""
    with torch.no_grad():
        idx = targets.long().unsqueeze(1)
        return torch.stack([u.float().softmax(-1).gather(1, idx).mean() for u in logits.values()])


def mlb_ratios(scores: Tensor) -> Tensor:
    """``r_m = mean_{j != m} s_j / s_m`` (``(s_1/s_0, s_0/s_1)`` for two modalities)."""
    m = scores.shape[0]
    if m < 2:
        raise ConfigError(f"MLB needs at least 2 modalities, got {m}")
    others = (scores.sum() - scores) / (m - 1)
    return others / scores.clamp_min(1e-12)


def mlb_coefficients(ratios: Tensor, alpha: float, beta_max: float | None = None) -> Tensor:
    """``k_m = 1 + tanh(alpha (r_m - 1))``; with ``beta_max``, ``1 + (beta_max - 1) tanh(...)``
    where ``r_m > 1`` (the weak modality's ceiling is ``beta_max``)."""
    t = torch.tanh(alpha * (ratios - 1))
    if beta_max is None:
        return 1 + t
    return torch.where(ratios > 1, 1 + (beta_max - 1) * t, 1 + t)


@dataclass
class MLBParams:
    """MLB options.

    Attributes:
        alpha: steepness of the coefficient k_m = 1 + tanh(alpha (r_m - 1)).
        beta_max: ceiling of the weak modality's coefficient (null: the default 1 + tanh form).
        lam_uni: weight of each unimodal-head loss.
    """

    alpha: float = 1.0
    beta_max: float | None = None
    lam_uni: float = 1.0

    def __post_init__(self) -> None:
        check(self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}")
        check(
            self.beta_max is None or self.beta_max >= 0,
            f"method.beta_max must be >= 0 or null, got {self.beta_max}",
        )
        check(self.lam_uni >= 0, f"method.lam_uni must be >= 0, got {self.lam_uni}")


@METHODS.register("mlb")
class MLB(Method):
    """Multi-Loss Balanced (BMVC 2024): multi-loss plus per-modality gradient coefficients
    ``1 + tanh(alpha (r_m - 1))`` from the unimodal heads' batch confidence."""

    name = "mlb"
    tasks = ("classification",)
    Params = MLBParams
    needs_unimodal_heads = True
    scales_gradients = True
    search_space = ("method.alpha", (0.5, 2.0, 5.0))

    def coefficients(self, output: ModelOutput, ctx: StepContext) -> Tensor:
        """``(M,)`` coefficients of this batch (rank-averaged scores under DDP); logs them."""
        if set(output.unimodal_logits) != set(output.latents):
            raise ConfigError("method 'mlb' needs a unimodal head for every modality")
        uni = {m: output.unimodal_logits[m] for m in output.latents}
        scores = confidence_scores(uni, ctx.targets)
        if ctx.world_size > 1:
            scores = ctx.all_reduce(scores) / ctx.world_size
        ratios = mlb_ratios(scores)
        coeff = mlb_coefficients(ratios, self.params.alpha, self.params.beta_max)
        for i, m in enumerate(uni):
            ctx.log(f"score_{m}", scores[i])
            ctx.log(f"ratio_{m}", ratios[i])
            ctx.log(f"coeff_{m}", coeff[i])
        return coeff

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        coeff = self.coefficients(output, ctx)
        k = {m: coeff[i] for i, m in enumerate(output.latents)}
        if output.contributions is not None:
            # c_m feeds only the fused logits: scaling the gradient that reaches it scales m's
            # block of the fusion head and the encoder's fused gradient, with no extra operation
            for m, c in output.contributions.items():
                if c.requires_grad:
                    c.register_hook(multiply_by(k[m]))
            fused = output.logits
        else:
            if ctx.fusion is None:
                raise ConfigError("method 'mlb' needs the fusion head (StepContext.fusion)")
            scaled = {m: scale_grad(z, k[m]) for m, z in output.latents.items()}
            fused = ctx.fusion(scaled, ()).logits
        terms = {"task": ctx.task_loss(fused)}
        for m, u in output.unimodal_logits.items():
            if u.requires_grad:
                u.register_hook(multiply_by(k[m]))
            terms[f"uni_{m}"] = self.params.lam_uni * ctx.task_loss(u)
        return terms
