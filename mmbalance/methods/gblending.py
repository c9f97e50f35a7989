"""Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-Modal Classification
Networks Hard?", CVPR 2020).

The model has one head per modality (the unimodal heads) and the fused head; the loss is
``sum_k w_k * CE_k`` over these ``K = M + 1`` heads, with weights from each head's
**overfitting-to-generalisation** behaviour over a *super-epoch* of ``super_epoch`` epochs.
For head ``k``, with ``L^H`` its loss on a held-out part of the training split and ``L^T`` its
loss on the part that trains (both measured by a no-grad, eval-mode pass at the super-epoch
boundaries ``N`` and ``N + n``)::

    dG_k = L^H_k(N) - L^H_k(N + n)                  generalisation gained over the super-epoch
    O_k  = L^H_k(N + n) - L^T_k(N + n)              overfitting at its end
    w_k  = |dG_k| / O_k^2,  normalised to sum to 1

(the paper's first-order optimum ``w_k ~ dG_k / O_k^2``; the absolute value, as in
BalanceBenchmark, keeps a weight non-negative when a head's held-out loss rose). With
``overfitting="gap_change"`` the denominator is instead the *change* of the overfitting over the
super-epoch, ``(O_k(N + n) - O_k(N))^2``, as BalanceBenchmark computes it. A head whose
``O`` is 0 would get an infinite weight: ``O^2`` is floored at 1e-12, and if every gain is 0 the
weights stay as they were.

Modes: ``online`` re-estimates the weights at the end of every super-epoch from the current
model's heads; ``offline`` estimates them once, at the end of the first super-epoch, and keeps
them. The first super-epoch trains with uniform weights ``1/K``.

The held-out part (``held_out``, a stratified fraction of the *training* split that never
trains) is the only data the weights see: never the validation split (model selection uses it)
and never the test split.

Departures from the paper and its ports:

- The paper estimates ``dG`` and ``O`` by training a copy of each unimodal model and of the
  multimodal model for the super-epoch (so do BalanceBenchmark's ``GBlendingTrainer`` and its
  offline mode, over the whole run); here they are measured on the heads of the one model being
  trained with the blended loss, which costs two no-grad passes per super-epoch instead of
  ``K`` extra trainings.
- ``offline`` here trains on from the first super-epoch with the estimated weights; the paper's
  offline G-Blend restarts from scratch with them.
- BalanceBenchmark reads its "validation" loss on the test split (its val split is the test
  split), sums losses over batches instead of averaging them (so ``O`` mixes the number of
  training and test batches), and divides by the squared *change* of the overfitting.

Settings. The paper trains video models (R(2+1)D on Kinetics); there is no official CREMA-D or
AVE recipe. BalanceBenchmark runs it on CREMA-D with ``super_epoch`` 10, online, AdamW lr 1e-3,
weight decay 0.01, StepLR(10, 0.1), 30 epochs, batch 32 (``configs/gblending/``). The default
here is a 5-epoch super-epoch so that short runs re-estimate the weights more than once.

Cost: joint training with unimodal heads, plus a no-grad pass over the training and held-out
data at the start and once per super-epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    EpochContext,
    Method,
    ModelInfo,
    SplitFeatures,
    StepContext,
)
from mmbalance.models.output import ModelOutput

FUSED = "fused"
_O2_FLOOR = 1e-12


@dataclass
class GBlendingParams:
    """G-Blending options.

    Attributes:
        super_epoch: epochs between two estimates of the head weights.
        mode: online (re-estimate every super-epoch) or offline (estimate once, then fixed).
        held_out: part of the training split held out (never trained on) for the estimates.
        overfitting: the denominator: the squared overfitting gap O^2 (the paper) or its squared
            change (BalanceBenchmark).
    """

    super_epoch: int = 5
    mode: Literal["online", "offline"] = "online"
    held_out: float = 0.1
    overfitting: Literal["gap", "gap_change"] = "gap"

    def __post_init__(self) -> None:
        check(self.super_epoch >= 1, f"method.super_epoch must be >= 1, got {self.super_epoch}")
        check(0 < self.held_out < 1, f"method.held_out must be in (0, 1), got {self.held_out}")


# --- the weights ---------------------------------------------------------------------------------
def blending_weights(
    held_before: Mapping[str, float],
    held_after: Mapping[str, float],
    train_after: Mapping[str, float],
    train_before: Mapping[str, float] | None = None,
) -> dict[str, float] | None:
    """Normalised ``|dG_k| / O_k^2`` per head, from held-out and training losses at the start
    and end of a super-epoch; ``O_k`` is the overfitting at the end, or, when ``train_before``
    is given, its change over the super-epoch. ``None`` when every gain is 0."""
    raw = {}
    for k in held_after:
        gain = held_before[k] - held_after[k]
        overfit = held_after[k] - train_after[k]
        if train_before is not None:
            overfit -= held_before[k] - train_before[k]
        raw[k] = abs(gain) / max(overfit * overfit, _O2_FLOOR)
    total = sum(raw.values())
    if not total > 0 or not math.isfinite(total):
        return None
    return {k: v / total for k, v in raw.items()}


def head_losses(features: SplitFeatures) -> dict[str, float]:
    """Mean cross-entropy of the fused head and of every unimodal head on a split pass."""
    targets = features.targets
    out = {FUSED: float(F.cross_entropy(features.logits, targets))}
    for m, logits in features.unimodal_logits.items():
        out[m] = float(F.cross_entropy(logits, targets))
    return out


# --- the method ----------------------------------------------------------------------------------
@METHODS.register("gblending")
class GradientBlending(Method):
    """Gradient-Blending (CVPR 2020): per-head loss weights from held-out overfitting/generalisation."""

    name = "gblending"
    tasks = ("classification",)
    Params = GBlendingParams
    needs_unimodal_heads = True
    search_space = ("method.super_epoch", (2, 5, 10))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        # the first estimate ends the first super-epoch; its weights train from epoch super_epoch
        if params.super_epoch >= epochs:
            cls.refuse_idle_schedule(
                f"in epoch {params.super_epoch} (0-based; super_epoch={params.super_epoch})",
                epochs,
                "lower method.super_epoch or raise train.epochs",
            )

    def __init__(self, params: GBlendingParams | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.weights: dict[str, float] = {}
        self._held: dict[str, float] | None = None  # held-out losses at the last boundary
        self._train: dict[str, float] | None = None  # training losses at the last boundary
        self._estimates = 0

    @property
    def held_out_fraction(self) -> float:
        return self.params.held_out

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        heads = [FUSED, *info.modalities]
        self.weights = {k: 1.0 / len(heads) for k in heads}
        return None

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        if len(output.unimodal_logits) != len(self.weights) - 1:
            raise ConfigError("gblending needs a unimodal head for every modality")
        terms = {"task": self.weights[FUSED] * ctx.task_loss(output.logits)}
        for m, logits in output.unimodal_logits.items():
            terms[f"uni_{m}"] = self.weights[m] * ctx.task_loss(logits)
        return terms

    # --- the estimates ----------------------------------------------------------------------------
    def _measure(self, ctx: EpochContext) -> tuple[dict[str, float], dict[str, float]]:
        return head_losses(ctx.features("held_out")), head_losses(ctx.features("train"))

    def on_train_start(self, ctx: EpochContext) -> None:
        self._held, self._train = self._measure(ctx)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        for k, w in self.weights.items():
            ctx.log(f"weight_{k}", w)

    def on_epoch_end(self, ctx: EpochContext) -> None:
        p = self.params
        if (ctx.epoch + 1) % p.super_epoch:
            return
        if p.mode == "offline" and self._estimates > 0:
            return
        if self._held is None or self._train is None:
            raise RuntimeError("gblending: no initial measurement (on_train_start did not run)")
        held, train = self._measure(ctx)
        before = self._train if p.overfitting == "gap_change" else None
        weights = blending_weights(self._held, held, train, before)
        for k in held:
            ctx.log(f"gain_{k}", self._held[k] - held[k])
            ctx.log(f"overfit_{k}", held[k] - train[k])
        if weights is not None:
            self.weights = weights
        self._estimates += 1
        self._held, self._train = held, train

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "held": None if self._held is None else dict(self._held),
            "train": None if self._train is None else dict(self._train),
            "estimates": self._estimates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights = dict(state["weights"])
        self._held = None if state["held"] is None else dict(state["held"])
        self._train = None if state["train"] is None else dict(state["train"])
        self._estimates = int(state["estimates"])
