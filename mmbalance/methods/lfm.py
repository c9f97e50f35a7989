"""LFM: learning to fuse modalities with a dynamically weighted modality gap (Yang et al.,
NeurIPS 2024, "Facilitating Multimodal Classification via Dynamically Learning Modality Gap").

The cross-entropy on the fused prediction is combined with an alignment term that pulls the
modalities' own predictions together, with a weight that is learned during training::

    L = 2 * ((1 - alpha) * CE(fused) + alpha * mean over pairs (a, b) of JS(p_a, p_b))

``p_m = softmax(z_m)`` with ``z_m`` modality ``m``'s own logits (for additive heads its slice of
the fused layer plus ``b / M``, so that the fused logits are their sum ``o_a + o_v``, where the
official model averages them: see below; otherwise the unimodal heads), and ``JS(p, q) = (KL(p || m) + KL(q || m)) / 2``
with ``m = (p + q) / 2``, averaged over the batch.

The weight update (once per epoch, before the epoch trains)
-----------------------------------------------------------
On data the model does not train on, with ``L_total = (1 - alpha) CE + alpha JS`` (no factor 2)
and ``v = grad_theta CE``::

    g     = mean of the entries of (H v) restricted to theta_0,   H = Hessian of L_total
    alpha <- clip(alpha - lr_alpha * 0.5^(epoch // halve_every) * g, alpha_min, alpha_max)

``theta_0`` is the first trainable parameter tensor of the model (the first encoder's first
tensor), as in the official code (``hessian_vector_prod[0].mean()``, over ``model.parameters()``);
``H v`` itself involves every trainable parameter. It is computed exactly by double
backpropagation, in two passes over the held-out batches (the first accumulates ``v``, the second
differentiates ``<grad L_total, v>``), with the model in eval mode so that the held-out samples
leave no trace in batch-norm statistics. The held-out data are a stratified part
(``held_out``, default 2 %) of the **training** split that the trainer keeps out of training
(:attr:`Method.held_out_fraction`): never validation, which selects the model, and never test.

Sources and departures
----------------------
- **The cross-entropy's logits.** The authors' code (njustkmg/NeurIPS24-LFM @ad44fa0,
  ``Crema_epoch_learnable.py``) trains and evaluates the cross-entropy on the *average* of the two
  heads' logits, ``CE(0.5 o_a + 0.5 o_v)``. Here, as in BalanceBenchmark (``LFM_trainer.py``
  @4c1482f, ``criterion(model.unimodal_result['output'])``), it is the fused head's output, which
  for the additive heads is their *sum*, ``o_a + o_v`` (plus the shared bias): the same
  prediction, with logits twice as large, so the softmax is sharper and the cross-entropy's
  gradient differs (a factor 2 inside the softmax, not a constant). It keeps one model for every
  method and any fusion head.
- Official code (njustkmg/NeurIPS24-LFM, ``Crema_epoch_learnable.py``): SGD lr 1e-2, momentum
  0.9, weight decay 1e-4, StepLR(70, 0.1), batch 64, 200 epochs, one ResNet-18 per modality with
  its own linear head, fused = average of the two heads' logits. It holds out 16 training samples
  and computes the update on the first half of them; the alignment weight starts at 0.95 (its
  ``cls_k = [0.05, 0.95]``: CE weight 0.05) and falls as the CE weight rises (its polynomial fit
  of a learned run, ``getAlpha_Learnable_Fitted``, gives 0.80 at epoch 0, 0.46 at epoch 100 and
  0.10 at epoch 200). ``lr_alpha`` 1e-4, halved every 20 epochs, clipped to [0.05, 0.95]. With
  these values the update moves the weight very little (``|g|`` is of the order of 1e-4 on the
  synthetic benchmark), so in practice the weight stays near its start.
- BalanceBenchmark (``LFM_trainer.py``): the same update on a quarter of the first validation
  batch, where validation is the test set; its ``alpha = {1: 0.05, 0: 0.95}`` starts the
  alignment weight at 0.05, the official code's CE weight (the two entries are swapped). We start
  at the official 0.95 (``alpha_init``; the accuracy benchmark's search tries 0.05, 0.5, 0.95).
- Both compute the "JS" as ``F.kl_div(p.log(), m)``, which is ``KL(m || p)``: the divergence
  with its arguments reversed. We compute the Jensen-Shannon divergence the code names
  (``js_score``), ``KL(p || m)``: bounded by ``ln 2`` and finite for saturated predictions.
- Held-out data here: the trainer's held-out part of the training split (see above), all of it,
  rather than 8 or so samples; the update is the same one per epoch.
- With more than two modalities the alignment term averages the pairs (BalanceBenchmark's
  ``loss_alignment / len(combinations)``).

Classification only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.methods.base import METHODS, EpochContext, Method, StepContext
from mmbalance.methods.ops.divergence import jsd
from mmbalance.methods.ops.modality_logits import modality_logits
from mmbalance.models.output import ModelOutput

if TYPE_CHECKING:
    from mmbalance.data.base import Batch


def alignment(logits: Mapping[str, Tensor]) -> Tensor:
    """Mean over modality pairs of the batch-mean Jensen-Shannon divergence of their softmaxes."""
    pairs = list(itertools.combinations(list(logits), 2))
    return torch.stack([jsd(logits[a], logits[b]) for a, b in pairs]).mean()


def lfm_objective(output: ModelOutput, targets: Tensor, fusion: object) -> tuple[Tensor, Tensor]:
    """``(CE(fused), alignment)`` of one forward pass."""
    return F.cross_entropy(output.logits, targets), alignment(modality_logits(output, fusion))


def alpha_gradient(model: nn.Module, batches: Callable[[], Iterable[Batch]], alpha: float) -> float:
    """``mean((H v)[theta_0])`` over the samples of ``batches()`` (see the module docstring).

    ``batches`` is called twice (one pass for ``v``, one for the Hessian-vector product); each
    batch's losses are batch means, so batch ``b`` of ``n_b`` samples weighs ``n_b / N``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("lfm's weight update needs trainable parameters")
    fusion = getattr(model, "fusion", None)
    was_training = model.training
    model.eval()
    try:
        total = 0
        v = [torch.zeros_like(p) for p in params]  # sum_b n_b grad CE_b, then divided by N
        for batch in batches():
            ce, _ = lfm_objective(model(batch.inputs), batch.targets, fusion)
            grads = torch.autograd.grad(ce, params, allow_unused=True)
            for acc, g in zip(v, grads, strict=True):
                if g is not None:
                    acc.add_(g, alpha=len(batch))
            total += len(batch)
        if total == 0:
            raise RuntimeError("lfm's weight update got no held-out samples")
        torch._foreach_div_(v, total)
        hvp = torch.zeros_like(params[0])
        for batch in batches():
            ce, align = lfm_objective(model(batch.inputs), batch.targets, fusion)
            objective = (1.0 - alpha) * ce + alpha * align
            grads = torch.autograd.grad(objective, params, create_graph=True, allow_unused=True)
            dot = sum((g * u).sum() for g, u in zip(grads, v, strict=True) if g is not None)
            if not isinstance(dot, Tensor) or not dot.requires_grad:
                continue  # no curvature reaches theta_0 from this batch
            (h,) = torch.autograd.grad(dot, [params[0]], allow_unused=True)
            if h is not None:
                hvp.add_(h, alpha=len(batch) / total)
    finally:
        model.train(was_training)
    return float(hvp.mean())


def alpha_step(alpha: float, grad: float, lr: float, low: float, high: float) -> float:
    """``clip(alpha - lr * grad, low, high)``."""
    return min(high, max(low, alpha - lr * grad))


@dataclass
class LFMParams:
    """LFM options.

    Attributes:
        alpha_init: initial weight of the alignment (Jensen-Shannon) term (official 0.95;
            BalanceBenchmark 0.05).
        lr_alpha: step size of the weight's update.
        halve_every: the step size halves every this many epochs.
        alpha_min: lower bound of the weight.
        alpha_max: upper bound of the weight.
        held_out: part of the training split kept out of training for the weight's update
            (never the validation split, which selects the model).
    """

    alpha_init: float = 0.95
    lr_alpha: float = 1e-4
    halve_every: int = 20
    alpha_min: float = 0.05
    alpha_max: float = 0.95
    held_out: float = 0.02

    def __post_init__(self) -> None:
        check(
            0.0 <= self.alpha_min <= self.alpha_max <= 1.0,
            f"method.alpha_min and alpha_max must satisfy 0 <= min <= max <= 1, "
            f"got {self.alpha_min}, {self.alpha_max}",
        )
        check(
            self.alpha_min <= self.alpha_init <= self.alpha_max,
            f"method.alpha_init must lie in [{self.alpha_min}, {self.alpha_max}], "
            f"got {self.alpha_init}",
        )
        check(self.lr_alpha >= 0, f"method.lr_alpha must be >= 0, got {self.lr_alpha}")
        check(self.halve_every >= 1, f"method.halve_every must be >= 1, got {self.halve_every}")
        check(0.0 < self.held_out < 1.0, f"method.held_out must be in (0, 1), got {self.held_out}")


@METHODS.register("lfm")
class LFM(Method):
    """LFM: ``2((1 - alpha) CE + alpha JS)``, alpha learned by a Hessian-vector step per epoch.

    The alignment weight ``alpha`` is updated before every epoch on held-out training data.

    Loss terms (``train_<term>``): ``task`` (``2 (1 - alpha) CE``), ``align`` (``2 alpha JS``).
    Logged per epoch: ``alpha`` (after the update) and ``alpha_grad``.
    """

    name = "lfm"
    tasks = ("classification",)
    Params = LFMParams
    search_space = ("method.alpha_init", (0.05, 0.5, 0.95))

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.alpha = self.params.alpha_init

    @property
    def held_out_fraction(self) -> float:
        return self.params.held_out

    def lr_alpha(self, epoch: int) -> float:
        """The update's step size in ``epoch``: halved every ``halve_every`` epochs."""
        return self.params.lr_alpha * 0.5 ** (epoch // self.params.halve_every)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if ctx.model is None:
            raise RuntimeError("lfm's weight update needs the model (EpochContext.model)")
        grad = alpha_gradient(ctx.model, lambda: ctx.batches("held_out"), self.alpha)
        if not math.isfinite(grad):
            raise RuntimeError(f"lfm's weight update got a non-finite gradient ({grad})")
        p = self.params
        self.alpha = alpha_step(
            self.alpha, grad, self.lr_alpha(ctx.epoch), p.alpha_min, p.alpha_max
        )
        ctx.log("alpha", self.alpha)
        ctx.log("alpha_grad", grad)

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        ce, align = lfm_objective(output, ctx.targets, ctx.fusion)
        return {"task": 2.0 * (1.0 - self.alpha) * ce, "align": 2.0 * self.alpha * align}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state["alpha"])
