"""Data Remixing (Ma, Chen, Deng, ICML 2025, "Improving Multimodal Learning Balance and
Sufficiency through Data Remixing"; official code MatthewMaxy/Remix_ICML2025 @80898aa, MIT,
``train.py`` and ``models/models.py``).

Each sample is given to the modality that is least sure about it, and training runs on
modality-pure batches, so that the modalities' gradients do not clash inside a batch:

- **Warm-up** (epochs ``< warmup_epochs``): ordinary batches, ``L = CE(o) + w sum_m CE(u_m)``
  (``w``: ``warmup_unimodal_weight``, official ``alpha = beta = 0.5``), with ``o`` the fused
  logits and ``u_m`` the unimodal heads' logits.
- **Remixing** (every later epoch, at its start): a no-grad, eval-mode pass over the training
  split computes each unimodal head's prediction ``p_m`` of every sample and its confidence
  ``KL(p_m || uniform) = sum_c p_c log2(p_c C)`` (``p`` clipped below at 1e-9, as in the
  official ``kl_divergence``). The sample joins the subset of the modality with the smallest KL
  (ties: the later modality; the official ``KL_audio < KL_video`` sends ties to video). The
  epoch then trains each subset in turn (:meth:`Remix.epoch_subsets`), in the reverse order of the
  modalities (the official code trains the video subset, its second modality, first), in shuffled
  batches; in a batch of modality ``m``'s subset every other modality's latents are multiplied by
  0 after its encoder (the official ``a[:, :] = 0.0``) and ``L = CE(o) + gamma CE(u_m)``
  (``gamma``: ``unimodal_weight``, official ``gamma1 = gamma2 = 1``).

The zeroed encoders still run and receive zero gradients, as in the official code (so, under
momentum and weight decay, their parameters still move by those). The pass at an epoch's start
depends only on the weights, and the subsets' batches are shuffled from ``(train.seed, epoch)``,
so a run is deterministic under its seed and a killed run resumes exactly.

Where this departs from the official code, and why:

- **Any number of classes.** The official ``kl_divergence(pred, 6)`` hard-codes CREMA-D's 6
  classes. The comparison of two modalities' KL is unaffected (the constant ``log2 6 - log2 C``
  cancels), but the divergence itself is wrong for other datasets; here ``C`` is the model's.
- **Any number of modalities**: the sample goes to the modality with the smallest KL of all.
- **Selection on validation.** The official code keeps the best epoch on its test loader; here
  the validation split selects. The official remixing pass reads the training split through the
  test-time transform (``mode='val'`` of the training list), as the trainer's eval-mode feature
  pass does.
- The subsets' batches are cut as the trainer's (a remainder that cannot form a batch of 2 is
  dropped; the official loaders keep it).

Official settings (``scripts/run_train.sh``, argument defaults; CREMA-D): Adam lr 5e-5, weight
decay 1e-4, StepLR(30, 0.1), batch 64, 60 epochs of which 10 warm-up, concat head with one linear
head per modality, ResNet-18 encoders from scratch. Classification only. Logged per epoch:
``subset_<m>`` (the size of modality ``m``'s subset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    EpochContext,
    EpochSubset,
    Method,
    ModelInfo,
    StepContext,
)
from mmbalance.models.output import ModelOutput


def confidence_kl(logits: Tensor) -> Tensor:
    """``(N,)`` ``KL(softmax(logits) || uniform)`` in bits, with the probabilities clipped to
    ``[1e-9, 1]``: ``sum_c p_c log2(p_c C)``."""
    p = logits.float().softmax(-1).clamp(1e-9, 1.0)
    return (p * (p.log2() + math.log2(logits.shape[-1]))).sum(-1)


def assign_to_least_confident(kl: Tensor) -> Tensor:
    """``(N,)`` the modality index with the smallest KL of each sample (``kl`` is ``(M, N)``);
    ties go to the later modality."""
    flipped = kl.flip(0).argmin(0)
    return kl.shape[0] - 1 - flipped


@dataclass
class RemixParams:
    """Data Remixing options.

    Attributes:
        warmup_epochs: epochs of ordinary training before the remixing starts (official 10 of
            60; the default 1 suits short runs, the shipped configs set the official value).
        warmup_unimodal_weight: weight of every unimodal head's cross-entropy during the warm-up
            (official 0.5).
        unimodal_weight: weight of the subset modality's unimodal cross-entropy in a remixed
            batch (official 1).
    """

    warmup_epochs: int = 1
    warmup_unimodal_weight: float = 0.5
    unimodal_weight: float = 1.0

    def __post_init__(self) -> None:
        check(
            self.warmup_epochs >= 0,
            f"method.warmup_epochs must be >= 0, got {self.warmup_epochs}",
        )
        check(
            self.warmup_unimodal_weight >= 0,
            f"method.warmup_unimodal_weight must be >= 0, got {self.warmup_unimodal_weight}",
        )
        check(
            self.unimodal_weight >= 0,
            f"method.unimodal_weight must be >= 0, got {self.unimodal_weight}",
        )


@METHODS.register("remix")
class Remix(Method):
    """Each sample to the modality least confident about it; modality-pure batches with the
    other modalities' latents zeroed."""

    name = "remix"
    Params = RemixParams
    needs_unimodal_heads = True
    search_space = ("method.unimodal_weight", (0.5, 1.0, 2.0))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        cls.refuse_late_start(params.warmup_epochs, epochs, "warmup_epochs")

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._subsets: list[EpochSubset] | None = None  # the coming epoch's, from its start

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.task != "classification":
            raise ConfigError(f"method 'remix' needs a classification task, got {info.task!r}")

    # --- the epoch's subsets --------------------------------------------------------------------
    def remixing(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on remixed subsets (after the warm-up)."""
        return epoch >= self.params.warmup_epochs

    def on_epoch_start(self, ctx: EpochContext) -> None:
        self._subsets = None
        if not self.remixing(ctx.epoch):
            return
        if self.info is None:
            raise ConfigError("method 'remix' was not set up (call setup before the epoch hooks)")
        features = ctx.features("train", 1.0)
        modalities = self.info.modalities
        missing = [m for m in modalities if m not in features.unimodal_logits]
        if missing:
            raise ConfigError("method 'remix' needs unimodal heads (set unimodal_heads=true)")
        kl = torch.stack([confidence_kl(features.unimodal_logits[m]) for m in modalities])
        owner = assign_to_least_confident(kl).cpu()
        index = features.index.cpu()
        subsets = []
        for i in reversed(range(len(modalities))):
            chosen = index[owner == i]
            subsets.append(EpochSubset(modalities[i], chosen))
            ctx.log(f"subset_{modalities[i]}", float(len(chosen)))
        self._subsets = subsets

    def epoch_subsets(self, ctx: EpochContext) -> Sequence[EpochSubset] | None:
        return self._subsets if self.remixing(ctx.epoch) else None

    # --- the steps ------------------------------------------------------------------------------
    def transform_latents(self, latents: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if ctx.subset is None:
            return latents
        return {m: z if m == ctx.subset else z * 0.0 for m, z in latents.items()}

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        task = ctx.task_loss(output.logits)
        if ctx.subset is None:
            if self.remixing(ctx.epoch):
                raise ConfigError(
                    "method 'remix' trains on the subsets of Method.epoch_subsets after its "
                    "warm-up: give every step its subset (StepContext.subset)"
                )
            uni = torch.stack([ctx.task_loss(u) for u in output.unimodal_logits.values()]).sum()
            return {"task": task, "unimodal": self.params.warmup_unimodal_weight * uni}
        if ctx.subset not in output.unimodal_logits:
            raise ConfigError(
                f"method 'remix' got the subset of an unknown modality {ctx.subset!r}"
            )
        uni = ctx.task_loss(output.unimodal_logits[ctx.subset])
        return {"task": task, "unimodal": self.params.unimodal_weight * uni}
