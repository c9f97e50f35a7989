"""ReconBoost (Hua et al., "ReconBoost: Boosting Can Achieve Modality Reconcilement", ICML 2024).

The model is a boosted ensemble of modality learners through one shared head (the
``shared_boost`` fusion head, :mod:`mmbalance.models.shared_head`)::

    F(x) = beta * sum_m h(phi_m(x_m))

Training alternates stages. Stage ``k`` (0-based) has two phases:

1. **Modality learner** (``epochs_per_stage`` epochs, official 4): only learner
   ``m = modalities[k mod M]`` trains (its encoder ``phi_m`` and the shared head ``h``; not
   ``beta``), with a fresh optimizer. With ``f_m = h(phi_m(x_m))``,
   ``p_ens = softmax(beta * sum_{j != m} h(phi_j(x_j)))`` (no gradient: the other learners are
   run under ``no_grad``) and ``C`` classes, the per-sample loss is the **reconcilement term**::

       l_rec = -(1/C) * (w1 - w2 * p_ens[y]) * log softmax(f_m)[y]

   (the official code's ``-w1 mean_c(onehot * log p_m) + w2 mean_c(onehot * p_ens * log p_m)``,
   the ``1/C`` of its mean over classes included): cross-entropy reweighted by how badly the
   other learners already fit the sample, the boosting residual. From stage 1 on it adds the
   **memory-consolidation** ("GA") term ``alpha * MSE(softmax(f_m), softmax(f_prev))`` against
   the learner of the previous stage (``f_prev = h(phi_prev(x_prev))``, no gradient).
2. **Global rectification** (``correct_epochs`` epochs, official 4): every encoder, ``h`` and
   ``beta`` train on ``CE(F(x), y)`` with a fresh optimizer.

Learners alternate cyclically, so any number of modalities works (the official code cycles over
three for MOSI/MOSEI/SIMS). The stages are :class:`~mmbalance.methods.base.Phase` objects: the
trainer freezes the other parameter groups and re-creates the optimizer at every phase change,
so nothing here special-cases the loop, and a run killed mid-stage resumes exactly.

Official code: huacong/ReconBoost @14ab57a (``train.py``, ``models/dynamic_net.py``). Followed:
the loss above, the stage lengths, per-phase SGD re-created every phase (momentum restarts),
``beta`` initialised at 1 and trained only in rectification, the other learners kept in training
mode while the current one learns (their batch-norm statistics move, as there). Departures:

- **Consolidation term.** The official code detaches *both* inputs of the MSE, so the term is a
  constant with no gradient (BalanceBenchmark's port inherits this). ``consolidation="paper"``
  (default) lets its gradient reach the current learner, as the paper intends;
  ``consolidation="official"`` reproduces the inert term (it still appears in the loss value).
- **One encoder pass fewer.** The official code runs the previous learner's encoder a second
  time for the consolidation term; here its latent from the ensemble pass is reused (same value;
  its batch-norm statistics move once per step instead of twice).
- **All learners in the ensemble from the start.** The official recipes load unimodal
  checkpoints (``--use_pretrain``), so every learner is in the ensemble from stage 0; that is
  what this implements. (Without ``--use_pretrain`` the official ensemble starts empty and the
  first rectification trains only the learners added so far.) Use
  ``train.unimodal_pretrain_epochs`` for the pre-trained start, as the shipped configs do.
- **Selection.** The official code keeps the best *test* accuracy at stage >= 3, measured once
  per stage, on a test loader with ``drop_last=True``; here model selection is the trainer's:
  validation only, every epoch.
- The official learner and rectification learning rates (``m_lr``, ``e_lr``) are equal in every
  shipped recipe (0.01), so one ``train.lr`` serves both. Its step decay (CREMA-D x0.1 every 30
  stages; AVE x0.5 at stage 40) is the trainer's step scheduler in epochs (a stage is
  ``epochs_per_stage + correct_epochs`` epochs).

Official settings (README): CREMA-D w1 5, w2 1, alpha 0.5, 4 + 4 epochs per stage, SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 64; AVE the same with w1 4.

Cost: a learner step is ``M - 1`` no-grad encoder passes plus one encoder's forward and
backward (cheaper than a joint step); a rectification step is a joint step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    EpochContext,
    Method,
    Phase,
    StepContext,
)
from mmbalance.models.output import ModelOutput
from mmbalance.models.shared_head import SharedBoostHead

Consolidation = Literal["paper", "official"]


@dataclass
class ReconBoostParams:
    """ReconBoost options.

    Attributes:
        epochs_per_stage: epochs of each modality learner's stage.
        correct_epochs: epochs of global rectification after each learner stage (0: none).
        weight1: w1 of the reconcilement weight (w1 - w2 p_ens[y]).
        weight2: w2 of the reconcilement weight.
        alpha: weight of the memory-consolidation term.
        consolidation: paper (its gradient reaches the current learner) or official (both inputs
            detached, so the term does nothing).
    """

    epochs_per_stage: int = 4
    correct_epochs: int = 4
    weight1: float = 5.0
    weight2: float = 1.0
    alpha: float = 0.5
    consolidation: Consolidation = "paper"

    def __post_init__(self) -> None:
        check(
            self.epochs_per_stage >= 1,
            f"method.epochs_per_stage must be >= 1, got {self.epochs_per_stage}",
        )
        check(
            self.correct_epochs >= 0,
            f"method.correct_epochs must be >= 0, got {self.correct_epochs}",
        )
        check(self.weight2 >= 0, f"method.weight2 must be >= 0, got {self.weight2}")
        check(
            self.weight1 >= self.weight2,
            f"method.weight1 must be >= method.weight2 ({self.weight2}) so that every sample's "
            f"weight w1 - w2 * p stays >= 0, got {self.weight1}",
        )
        check(self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}")


# --- the loss terms ------------------------------------------------------------------------------
def reconcile_loss(
    learner_logits: Tensor, ensemble_logits: Tensor, targets: Tensor, w1: float, w2: float
) -> Tensor:
    """Batch mean of ``-(1/C) * (w1 - w2 * softmax(ensemble)[y]) * log softmax(learner)[y]``.

    The ensemble (the other learners) gets no gradient.
    """
    num_classes = learner_logits.shape[1]
    index = targets.long().unsqueeze(1)
    p_ens = ensemble_logits.detach().softmax(-1).gather(1, index).squeeze(1)
    log_p = learner_logits.log_softmax(-1).gather(1, index).squeeze(1)
    return (-(w1 - w2 * p_ens) * log_p).mean() / num_classes


def consolidation_loss(learner_logits: Tensor, previous_logits: Tensor, inert: bool) -> Tensor:
    """``MSE(softmax(learner), softmax(previous))`` (mean over batch and classes).

    The previous learner never gets a gradient; with ``inert`` the current one gets none either
    (the official code's behaviour: a constant).
    """
    learner = learner_logits.softmax(-1)
    if inert:
        learner = learner.detach()
    return F.mse_loss(learner, previous_logits.detach().softmax(-1))


# --- the method ----------------------------------------------------------------------------------
@METHODS.register("reconboost")
class ReconBoost(Method):
    """ReconBoost (ICML 2024): alternating modality learners through a shared boosted head."""

    name = "reconboost"
    tasks = ("classification",)
    Params = ReconBoostParams
    fusion = "shared_boost"
    # w1: official 5 (CREMA-D), 4 (AVE); the MCR authors' ResNet rerun used 3
    search_space = ("method.weight1", (3.0, 4.0, 5.0))

    def _modalities(self) -> tuple[str, ...]:
        if self.info is None:
            raise RuntimeError("reconboost: setup() must run before training")
        return self.info.modalities

    def stage(self, epoch: int) -> tuple[int, str | None]:
        """``(stage index, learner)`` of ``epoch``; the learner is ``None`` in rectification."""
        p = self.params
        index, within = divmod(epoch, p.epochs_per_stage + p.correct_epochs)
        modalities = self._modalities()
        learner = modalities[index % len(modalities)]
        return index, (learner if within < p.epochs_per_stage else None)

    def phase(self, epoch: int) -> Phase:
        index, learner = self.stage(epoch)
        if learner is None:
            return Phase(f"stage{index}.rectification", None, reset_optimizer=True)
        groups = frozenset({f"encoder.{learner}", "fusion"})
        return Phase(f"stage{index}.learner.{learner}", groups, reset_optimizer=True)

    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        _, learner = self.stage(ctx.epoch)
        if learner is None:
            return model.encode(inputs)
        latents = model.encode(inputs, only=[learner])
        others = [m for m in self._modalities() if m != learner]
        with torch.no_grad():  # the ensemble of the other learners: values only
            latents |= model.encode(inputs, only=others)
        return latents

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        index, learner = self.stage(ctx.epoch)
        if learner is None:
            return {"task": ctx.task_loss(output.logits)}
        head = ctx.fusion
        if not isinstance(head, SharedBoostHead) or output.contributions is None:
            raise ConfigError("reconboost runs on the shared_boost fusion head")
        p = self.params
        modalities = self._modalities()
        own = head.learner_logits({learner: output.latents[learner]})[learner]
        ensemble = torch.stack(
            [output.contributions[m].detach() for m in modalities if m != learner]
        ).sum(0)
        terms = {"reconcile": reconcile_loss(own, ensemble, ctx.targets, p.weight1, p.weight2)}
        if index >= 1:
            previous = modalities[(index - 1) % len(modalities)]
            with torch.no_grad():
                prev = head.learner_logits({previous: output.latents[previous]})[previous]
            inert = p.consolidation == "official"
            terms["consolidation"] = p.alpha * consolidation_loss(own, prev, inert)
        return terms

    def on_epoch_end(self, ctx: EpochContext) -> None:
        head = getattr(ctx.model, "fusion", None)
        if isinstance(head, SharedBoostHead):
            ctx.log("boost_rate", head.boost_rate.detach())
