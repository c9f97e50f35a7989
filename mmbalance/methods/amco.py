"""AMCo: adaptive mask co-optimisation for modal dependence (Zhou et al., ICASSP 2023).

A model that depends on one modality is made to fit the others by masking that modality's class
logits (the *adaptive mask*), while its own cross-entropy keeps it from degrading (the
*co-optimisation*). Per training step, with ``z_m`` modality ``m``'s class logits (its slice of
the additive fusion layer plus ``b / M``, so that the fused logits are ``sum_m z_m``)::

    share_m   = (1/B) sum_i sum_c softmax([z_1,i ; ... ; z_M,i])_(m, c)   (joint softmax over M*C)
    dependent = {m : share_m > sigma}
    l_t       = k * epoch * progress_rate        (k: the step's index within its epoch)
    p_t       = sin(pi/2 * min(eps, l_t) / eps),  N = floor(p_t * C)
    mask      = C entries, N of them zero at random classes, the others one
    z~_m      = z_m * mask if m is dependent, else z_m
    L         = CE(linear_star(sum_m z~_m)) + sum_m CE(z~_m)

``linear_star`` is a ``C -> C`` linear layer owned by the method; predictions are
``linear_star(fused logits)``, never masked.

Sources, choices and fixes
--------------------------
The paper's text was not available to us (only its abstract); the formulas above follow
BalanceBenchmark's ``AMCo_trainer.py`` and ``BaseClassifierAMCoModel`` (GeWu-Lab/BalanceBenchmark
@4c1482f), with defaults ``sigma 0.5``, ``eps 0.3`` (its ``U 512`` and ``alpha 0.1`` are unused)
and the ``l_t`` schedule of its loop (``l_t`` restarts at 0 every epoch and grows by
``epoch / 10`` per batch, so epoch 0 is never masked and from epoch 1 on the mask is complete
within a few batches).

- **Per batch.** Dependence is the batch-mean share and one mask serves every sample of the step,
  which is what that code computes (the share is summed over the batch; the mask is one row).
  Under DDP the share sums are all-reduced and the mask is drawn from ``(seed, step)``, so every
  rank masks the same modality and classes.
- **The broadcast fault.** The code expands its ``(1, C)`` mask to ``(2, C)`` before multiplying
  ``(B, C)`` logits: that only broadcasts when DataParallel scatters it over exactly two GPUs
  (one row each). On one device it raises for any batch size but 1 and 2, and at batch size 1
  it silently turns the sample into two rows. Here the ``(C,)`` mask broadcasts over the batch
  on any number of devices.
- **Which logits decide dependence.** The code decides after each step, from that batch's
  already masked logits, and applies the decision to the next batch (none is dependent on the
  first batch of an epoch). Here the decision is taken on the current batch's unmasked logits,
  before masking, so a masked modality is not judged by its own masked output.
- **Head.** The method is defined on additive fusion heads (``late_sum``, ``concat_linear``;
  BalanceBenchmark has it for its concat head only); other heads are refused.

Classification only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, EpochContext, Method, ModelInfo, StepContext
from mmbalance.methods.ops.modality_logits import modality_logits
from mmbalance.models.output import ModelOutput


def dependence_shares(logits: Mapping[str, Tensor]) -> Tensor:
    """``(M,)`` batch sums of each modality's share of the joint softmax over all ``M * C``
    logits of a sample (no graph); divide by the batch size for the mean share."""
    with torch.no_grad():
        joint = torch.cat([z.float() for z in logits.values()], dim=1).softmax(-1)
        sizes = [z.shape[1] for z in logits.values()]
        return torch.stack([part.sum() for part in joint.split(sizes, dim=1)])


def mask_ratio(l_t: float, eps: float) -> float:
    """``p_t = sin(pi/2 * min(eps, l_t) / eps)``."""
    return math.sin(math.pi / 2 * min(eps, l_t) / eps)


def class_mask(num_classes: int, zeros: int, generator: torch.Generator) -> Tensor:
    """A ``(C,)`` mask with ``zeros`` zero entries at random classes and ones elsewhere."""
    mask = torch.ones(num_classes)
    mask[torch.randperm(num_classes, generator=generator)[:zeros]] = 0.0
    return mask


def amco_losses(
    logits: Mapping[str, Tensor],
    dependent: Mapping[str, bool],
    mask: Tensor,
    linear_star: nn.Module,
    targets: Tensor,
) -> dict[str, Tensor]:
    """``task = CE(linear_star(sum_m z~_m))`` and ``uni_<m> = CE(z~_m)`` with ``z~_m`` masked
    for the dependent modalities (``mask`` broadcasts over the batch)."""
    masked = {m: z * mask.to(z) if dependent[m] else z for m, z in logits.items()}
    fused = linear_star(torch.stack(list(masked.values())).sum(0))
    out = {"task": F.cross_entropy(fused, targets)}
    out |= {f"uni_{m}": F.cross_entropy(z, targets) for m, z in masked.items()}
    return out


@dataclass
class AMCoParams:
    """AMCo options.

    Attributes:
        sigma: share of the joint softmax over unimodal logits above which a modality counts
            as dependent.
        eps: the training progress at which the mask covers every masked class.
        progress_rate: the progress l_t grows by epoch * progress_rate per step.
        seed: seeds which classes are masked.
    """

    sigma: float = 0.5
    eps: float = 0.3
    progress_rate: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check(0.0 < self.sigma < 1.0, f"method.sigma must be in (0, 1), got {self.sigma}")
        check(self.eps > 0, f"method.eps must be > 0, got {self.eps}")
        check(
            self.progress_rate >= 0,
            f"method.progress_rate must be >= 0, got {self.progress_rate}",
        )


@METHODS.register("amco")
class AMCo(Method):
    """AMCo: mask the dependent modality's class logits, more as training goes on.

    The dependent modality's class logits are partly zeroed and every modality keeps its own
    cross-entropy (the co-optimisation).

    Loss terms (``train_<term>``): ``task``, ``uni_<m>``. Logged per step: ``mask_ratio``
    (``p_t``), ``share_<m>`` (batch-mean share), ``dependent_<m>`` (1 or 0).
    """

    name = "amco"
    tasks = ("classification",)
    Params = AMCoParams
    search_space = ("method.sigma", (0.5, 0.6, 0.7))

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.linear_star: nn.Linear | None = None
        self._epoch_first_step: int | None = None

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        if not info.additive_fusion:
            raise ConfigError(
                "method 'amco' masks each modality's class logits in an additive fusion head: "
                "use fusion=late_sum or fusion=concat_linear"
            )
        self.linear_star = nn.Linear(info.num_outputs, info.num_outputs)
        return self.linear_star

    def on_epoch_start(self, ctx: EpochContext) -> None:
        self._epoch_first_step = None  # l_t restarts with the epoch

    # Runs eagerly under ``train.compile``: the schedule is Python arithmetic on the step and
    # epoch counters (and state kept across steps), which Dynamo would otherwise trace as
    # symbolic integers once they change, and inductor's C++ code cannot evaluate ``sin`` of one.
    @torch.compiler.disable
    def step_mask(self, num_classes: int, ctx: StepContext) -> tuple[float, Tensor]:
        """``(p_t, mask)`` of this step."""
        if self._epoch_first_step is None:
            self._epoch_first_step = ctx.step
        k = ctx.step - self._epoch_first_step
        p_t = mask_ratio(k * ctx.epoch * self.params.progress_rate, self.params.eps)
        gen = torch.Generator().manual_seed(self.params.seed * 1_000_003 + ctx.step)
        return p_t, class_mask(num_classes, int(p_t * num_classes), gen)

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        if self.linear_star is None:
            raise RuntimeError("amco's setup has not run")
        logits = modality_logits(output, ctx.fusion)
        sums = dependence_shares(logits)
        count = torch.tensor(float(ctx.targets.shape[0]), device=sums.device)
        if ctx.world_size > 1:
            sums, count = ctx.all_reduce(sums), ctx.all_reduce(count)
        shares = sums / count
        dependent = {m: bool(shares[i] > self.params.sigma) for i, m in enumerate(logits)}
        p_t, mask = self.step_mask(output.logits.shape[1], ctx)
        ctx.log("mask_ratio", p_t)
        for i, m in enumerate(logits):
            ctx.log(f"share_{m}", shares[i])
            ctx.log(f"dependent_{m}", float(dependent[m]))
        return amco_losses(logits, dependent, mask, self.linear_star, ctx.targets)

    def predict(self, output: ModelOutput) -> Tensor:
        if self.linear_star is None:
            raise RuntimeError("amco's setup has not run")
        return self.linear_star(output.logits)
