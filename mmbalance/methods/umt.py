"""UMT: uni-modal teachers (Du et al., ICML 2023, "On Uni-Modal Feature Learning in Supervised
Multi-Modal Learning").

Joint training under-learns each modality's features; UMT distils features learned by
unimodal models into the multimodal model's encoders while it trains on the fused task::

    L = task_loss(fused) + lam * sum_m MSE(f_m^teacher(x_m), f_m(x_m))

with ``f_m`` the student's encoder output (the pooled latent) and ``f_m^teacher`` a frozen copy
of an encoder trained on modality ``m`` alone. The MSE is the mean over samples and feature
dimensions (``nn.MSELoss``).

How it runs here
----------------
- ``needs_unimodal_pretraining``: the trainer first trains each encoder with its own head alone
  (the ``ensemble`` method) and selects them on validation; at ``on_train_start`` those
  pre-trained encoders become the teachers (frozen, eval mode, kept in this method's state so
  that a resumed run restores them), and the students restart from the encoders as built
  (``student_init="scratch"``, :attr:`EpochContext.initial_encoder_state`), as in
  BalanceBenchmark, whose UMT model is created fresh while its teachers are loaded from the
  unimodal runs. ``student_init="pretrained"`` keeps the pre-trained weights in the students
  instead (the distillation term then starts at zero and acts as an anchor).
- Cost: one no-grad forward of every teacher encoder per step, as in the official code.
- A loop that never calls ``on_train_start`` (a bare step benchmark) distils towards the encoders
  as they are at the first step.

Official settings and departures
--------------------------------
BalanceBenchmark (``UMT_trainer.py``, GeWu-Lab/BalanceBenchmark @4c1482f): ``scaling 10`` (our
``lam``), AdamW lr 1e-3, StepLR(10, 0.1), 30 epochs, batch 32, concat head. Its teachers run in
training mode (their batch-norm statistics drift with every batch and dropout perturbs the
targets); ours run in eval mode, a frozen teacher. Its teacher checkpoints are the newest
unimodal runs, selected on test accuracy; ours are selected on validation. Its modulation window
(epochs 0 to 80) spans its whole runs, so the term is always on here. Any task (the task loss is
the run's, so regression works too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.methods.base import METHODS, EpochContext, Method, StepContext
from mmbalance.methods.ops.frozen_teachers import FrozenTeachers
from mmbalance.models.output import ModelOutput

StudentInit = Literal["scratch", "pretrained"]


def feature_distillation(
    latents: Mapping[str, Tensor], teacher_latents: Mapping[str, Tensor]
) -> Tensor:
    """``sum_m MSE(teacher_m, f_m)``: mean squared error per modality, summed over modalities."""
    return torch.stack(
        [F.mse_loss(latents[m], teacher_latents[m].detach()) for m in teacher_latents]
    ).sum()


@dataclass
class UMTParams:
    """UMT options.

    Attributes:
        lam: weight of the feature distillation (BalanceBenchmark's scaling).
        student_init: the students restart from the encoders as built (scratch) or keep the
            pre-trained weights (pretrained).
    """

    lam: float = 10.0
    student_init: StudentInit = "scratch"

    def __post_init__(self) -> None:
        check(self.lam >= 0, f"method.lam must be >= 0, got {self.lam}")


@METHODS.register("umt")
class UMT(Method):
    """UMT: task loss plus ``lam * sum_m MSE`` to frozen, unimodally pre-trained encoders.

    Each encoder's features are pulled towards those of a frozen pre-trained copy of it.

    Loss terms (``train_<term>``): ``task``, ``distill`` (``lam`` times the summed MSE).
    """

    name = "umt"
    Params = UMTParams
    needs_unimodal_pretraining = True
    search_space = ("method.lam", (3.0, 10.0, 30.0))

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._teachers = FrozenTeachers()

    # --- teachers ------------------------------------------------------------------------------
    def on_train_start(self, ctx: EpochContext) -> None:
        if ctx.model is None:
            raise RuntimeError("umt's on_train_start needs the model (EpochContext.model)")
        encoders: Any = ctx.model.encoders  # type: ignore[union-attr]
        self._teachers.capture(encoders)
        if self.params.student_init == "scratch":
            if not ctx.initial_encoder_state:
                raise RuntimeError(
                    "umt with student_init=scratch needs EpochContext.initial_encoder_state"
                )
            encoders.load_state_dict(ctx.initial_encoder_state)

    def teachers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The frozen teacher encoders, built on first use from ``model``'s encoders (for their
        architecture and device) and the saved teacher weights."""
        encoders: Any = model.encoders
        return self._teachers.modules(lambda: encoders)

    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        self.teachers(model)  # materialise the teachers while the model is at hand
        return model.encode(inputs)  # type: ignore[operator]

    # --- the loss --------------------------------------------------------------------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        teachers = self._teachers.built
        if teachers is None or ctx.inputs is None:
            raise RuntimeError("umt's losses need its encode hook to run first, with ctx.inputs")
        with torch.no_grad():
            teacher_latents = {m: t(ctx.inputs[m]) for m, t in teachers.items()}
        return {
            "task": ctx.task_loss(output.logits),
            "distill": self.params.lam * feature_distillation(output.latents, teacher_latents),
        }

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self._teachers.state_dict()
        return {} if state is None else {"teachers": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._teachers.load_state_dict(state.get("teachers"))
