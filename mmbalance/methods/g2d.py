"""G2D: gradient-guided distillation (Rakib & Bagavathi, ICCV 2025, "Boosting Multimodal Learning
with Gradient-Guided Distillation"; official code rAIson-Lab/G2D @95969d8, MIT, ``student.py``,
``utils/utils.py`` and ``config.py``).

Frozen unimodal teachers (an encoder and its linear head, each trained on its modality alone)
distil into the multimodal student, and the encoder of the modality whose teacher is the more
confident on the batch is frozen for that step (sequential modality prioritisation, SMP)::

    L = CE(o, y) + sum_m [ w_logit * T^2 KL(softmax(l_m / T) || softmax(o / T))
                           + w_feat * MSE(f_m, f_m^T) ]

with ``o`` the student's fused logits, ``l_m`` teacher ``m``'s logits, ``f_m`` and ``f_m^T`` the
student's and the teacher's latents (``MSE`` the mean over samples and dimensions), ``T`` the
``temperature`` (official 1) and both weights 1. SMP, every step of the window
``start_epoch <= epoch <= end_epoch``: ``rho_m = sum_batch softmax(l_m)[y]`` from the teachers;
the gradients of the modality with the largest ``rho`` are multiplied by 0 after backward (the
others by 1), so its encoder does not learn from this batch while the others do. Under SGD with
momentum and weight decay its parameters still move by those (as in the official code, which
multiplies the gradients by 0 rather than freeing them).

How it runs here: ``needs_unimodal_pretraining``; the trainer first trains every encoder with its
unimodal head alone and selects them on validation; at ``on_train_start`` those become the
teachers (frozen, eval mode, kept in this method's state so that a resume restores them), the
student encoders restart from their weights as built (``EpochContext.initial_encoder_state``), as
the official student is built fresh, and the student's unimodal heads, which held the teachers'
heads, are re-initialised. The official student has no unimodal heads; here they train as probes
on detached latents (loss term ``probe``), so that the per-modality accuracies a run reports
describe the student, while they touch neither the encoders nor the prediction.

Where this departs from the official code, and why:

- **Which gradients SMP freezes** (``freeze``). The official code multiplies the gradients of the
  4-D tensors (convolution kernels) of the chosen encoder, leaving batch-norm parameters and
  biases to train. ``freeze="weights"`` (default) takes every tensor of two or more dimensions,
  which on ResNet-18 encoders is exactly the official set and on other encoders (MLPs,
  Transformers) also includes their linear weights, so SMP acts on them; ``freeze="all"`` freezes
  the whole encoder, the paper's wording.
- **Ties.** The official code raises an error when the two teachers' scores are equal; here no
  encoder is frozen for that batch.
- **Any number of modalities.** The encoder of the most confident teacher is frozen, the others
  train (for two modalities, the official rule).
- **Teachers selected on validation.** The official teacher checkpoints are the best test epochs
  of separate runs; here the unimodal pre-training selects on the validation split. The
  official student is selected on test too; here on validation.
- The official late-fusion head averages the two linear heads' logits; the shipped configs use the
  ``late_sum`` head, which sums them (the same model up to a factor 2 in the fused logits' scale).

Official settings (``config.py``, CREMA-D): SGD lr 1e-3, momentum 0.9, weight decay 1e-4,
StepLR(200, 0.1), batch 16, 300 epochs (teachers and student alike), late fusion, SMP in epochs
0 to 150, ResNet-18 encoders. Classification only. Logged per step: ``teacher_score_<m>`` and
``frozen_<m>`` (1 for the frozen encoder).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, EpochContext, Method, ModelInfo, StepContext
from mmbalance.methods.ops.discrepancy import score_sums
from mmbalance.methods.ops.frozen_teachers import FrozenTeachers
from mmbalance.models.output import ModelOutput

FrozenTensors = Literal["weights", "all"]


def logit_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, the batch mean (the official
    ``kl_div(..., reduction="batchmean") * T**2``)."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    q = F.softmax(teacher.detach() / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def frozen_modality(scores: Tensor) -> int | None:
    """The index of the modality whose teacher scores highest; ``None`` on a tie for the top."""
    values = scores.tolist()
    best = max(values)
    if values.count(best) > 1:
        return None
    return values.index(best)


@dataclass
class G2DParams:
    """G2D options.

    Attributes:
        logit_distill_weight: weight of each teacher's logit distillation into the fused logits
            (official 1).
        feature_distill_weight: weight of each teacher's feature distillation (MSE) into the
            student's latents (official 1).
        temperature: distillation temperature ``T`` (official 1).
        freeze: which gradients of the chosen encoder SMP zeroes: ``weights`` (tensors of two or
            more dimensions; on ResNet-18 encoders the official convolution kernels) or ``all``.
        start_epoch: first epoch in which SMP freezes an encoder (official 0).
        end_epoch: last epoch in which it does, inclusive (official 150 of 300); null: to the
            end.
    """

    logit_distill_weight: float = 1.0
    feature_distill_weight: float = 1.0
    temperature: float = 1.0
    freeze: FrozenTensors = "weights"
    start_epoch: int = 0
    end_epoch: int | None = None

    def __post_init__(self) -> None:
        check(
            self.logit_distill_weight >= 0,
            f"method.logit_distill_weight must be >= 0, got {self.logit_distill_weight}",
        )
        check(
            self.feature_distill_weight >= 0,
            f"method.feature_distill_weight must be >= 0, got {self.feature_distill_weight}",
        )
        check(self.temperature > 0, f"method.temperature must be > 0, got {self.temperature}")
        check(self.start_epoch >= 0, f"method.start_epoch must be >= 0, got {self.start_epoch}")
        check(
            self.end_epoch is None or self.end_epoch >= self.start_epoch,
            f"method.end_epoch must be >= method.start_epoch ({self.start_epoch}) or null, "
            f"got {self.end_epoch}",
        )

    def freezing(self, epoch: int) -> bool:
        """Whether SMP acts in ``epoch``."""
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch <= self.end_epoch)


class Teacher(nn.Module):
    """A frozen unimodal teacher: an encoder and its linear head."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.encoder(x)
        return latent, self.head(latent)


@METHODS.register("g2d")
class G2D(Method):
    """Unimodal teachers distil features and logits into the student; the encoder of the most
    confident teacher's modality is frozen for the batch."""

    name = "g2d"
    Params = G2DParams
    needs_unimodal_heads = True
    needs_unimodal_pretraining = True
    search_space = ("method.logit_distill_weight", (0.5, 1.0, 2.0))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        cls.refuse_late_start(params.start_epoch, epochs, "start_epoch")

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._teachers = FrozenTeachers()

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        if info.task != "classification":
            raise ConfigError(f"method 'g2d' needs a classification task, got {info.task!r}")
        return None

    # --- teachers ------------------------------------------------------------------------------
    @staticmethod
    def _unimodal_models(model: Any) -> dict[str, Teacher]:
        """Every modality's encoder and unimodal head of ``model``, as teachers (references)."""
        if not len(model.unimodal_heads):
            raise ConfigError("method 'g2d' needs unimodal heads (its teachers' classifiers)")
        return {m: Teacher(enc, model.unimodal_heads[m]) for m, enc in model.encoders.items()}

    def on_train_start(self, ctx: EpochContext) -> None:
        if ctx.model is None:
            raise RuntimeError("g2d's on_train_start needs the model (EpochContext.model)")
        model: Any = ctx.model
        self._teachers.capture(self._unimodal_models(model))
        if not ctx.initial_encoder_state:
            raise RuntimeError("g2d needs EpochContext.initial_encoder_state (the students' start)")
        model.encoders.load_state_dict(ctx.initial_encoder_state)
        for head in model.unimodal_heads.values():
            if hasattr(head, "reset_parameters"):
                head.reset_parameters()

    def teachers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The frozen teachers, built on first use from ``model``'s encoders and unimodal heads
        (for their architecture and device) and the saved teacher weights."""
        return self._teachers.modules(lambda: self._unimodal_models(model))

    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        self.teachers(model)  # materialise the teachers while the model is at hand
        ctx.scratch["g2d_unimodal_heads"] = model.unimodal_heads
        return model.encode(inputs)  # type: ignore[operator]

    # --- the step ---------------------------------------------------------------------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        teachers = self._teachers.built
        if teachers is None or ctx.inputs is None:
            raise RuntimeError("g2d's losses need its encode hook to run first, with ctx.inputs")
        p = self.params
        with torch.no_grad():
            taught = {m: t(ctx.inputs[m]) for m, t in teachers.items()}
        scores = score_sums({m: t[1] for m, t in taught.items()}, ctx.targets)
        if ctx.world_size > 1:
            scores = ctx.all_reduce(scores)
        modalities = list(taught)
        frozen = frozen_modality(scores) if p.freezing(ctx.epoch) else None
        ctx.scratch["g2d_frozen"] = None if frozen is None else modalities[frozen]
        for i, m in enumerate(modalities):
            ctx.log(f"teacher_score_{m}", scores[i])
            ctx.log(f"frozen_{m}", float(frozen == i))
        logit = torch.stack(
            [logit_distillation(output.logits, t[1], p.temperature) for t in taught.values()]
        ).sum()
        feature = torch.stack(
            [F.mse_loss(output.latents[m], t[0].detach()) for m, t in taught.items()]
        ).sum()
        terms = {
            "task": ctx.task_loss(output.logits),
            "logit_distill": p.logit_distill_weight * logit,
            "feature_distill": p.feature_distill_weight * feature,
        }
        heads = ctx.scratch.get("g2d_unimodal_heads")
        if heads:
            terms["probe"] = torch.stack(
                [ctx.task_loss(heads[m](z.detach())) for m, z in output.latents.items()]
            ).sum()
        return terms

    def rewrite_gradients(self, ctx: StepContext) -> None:
        frozen = ctx.scratch.get("g2d_frozen")
        if frozen is None:
            return
        with torch.no_grad():
            for param in ctx.encoder_params.get(frozen, ()):
                if param.grad is not None and (self.params.freeze == "all" or param.dim() >= 2):
                    param.grad.mul_(0.0)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self._teachers.state_dict()
        return {} if state is None else {"teachers": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._teachers.load_state_dict(state.get("teachers"))
