"""PMR: Prototypical Modal Rebalance (Fan et al., CVPR 2023).

Follows the official code (``fanyunfeng-bit/Modal-Imbalance-PMR``, ``main_Prototype_grad.py``).

Prototypes. Before every epoch, one prototype per class and modality, ``c_k^m``, the mean latent
of modality ``m`` over the samples of class ``k`` in a part (``fraction``, official 10 %) of the
training split, taken without gradients in eval mode (``EpochContext.features("train",
fraction)``, a random subset drawn from the seed and epoch, which matches the official "first 10 %
of the shuffled train batches"). From epoch ``ema_start_epoch`` on they are an exponential moving
average, ``c <- (1 - mu) c_new + mu c_old`` (``momentum``, official ``momentum_coef`` 0.2); before
it, the new class means replace them. A class absent from the subset keeps its previous prototype
(the official code divides by a zero count and gets NaN); at the first computation it gets the
mean of all sampled latents.

The official schedule (``ema_start_epoch=2``, the default). ``calculate_prototype`` skips the
moving average when its ``epoch`` argument is ``<= 0``; it is called once before training with
epoch 0 and after each epoch ``e`` with ``e``, so the call after the first epoch (``e = 0``) skips it
too: the prototypes of epochs 0 and 1 are plain class means, and the moving average starts with
the prototypes of epoch 2, the third. ``ema_start_epoch=1`` averages from the second computation on
(the rule this library followed before, whose epoch-1 prototypes are not the official ones).

Loss, each step inside the modulation window (``start <= epoch <= end``):

- ``d_k^m = ||z^m - c_k^m||_2`` (not squared), ``p^m = softmax(-d^m)``;
- prototype cross-entropy ``L_PCE^m = CE(-d^m, y)``;
- scores ``s_m = sum_b p^m_b[y_b]`` (no graph); modality ``m`` is *weak* when ``s_m`` is below the
  mean of the other modalities' scores. For two modalities with ``rho = s_a / s_v``: ``rho > 1``
  adds ``alpha L_PCE^v``, ``rho < 1`` adds ``alpha L_PCE^a``, ``rho = 1`` nothing: the official
  binary rule (``beta``/``lam`` = ``alpha`` or 0). With ``M > 2`` every modality below the mean of
  the others gets ``alpha L_PCE^m`` (the official code handles two modalities only);
- ``L = CE(fused) + alpha sum_{m weak} L_PCE^m``.

The gradient of ``L_PCE`` reaches only the weak modality's encoder (the prototypes are constants),
pulling its latents toward their class prototype and away from the others.

Prototypical entropy regularisation (PER). The paper adds, in early epochs, an entropy term on
the *dominant* modality's prototype distribution to keep it from converging prematurely. **The
official code does not contain it** (fanyunfeng-bit/Modal-Imbalance-PMR#4, #7, #9, unanswered;
BalanceBenchmark lacks it too), and the paper's exact weighting and schedule were not available
to us. Offered as an option (``lam_entropy``, default 0 = the official code): for epochs
``< entropy_epochs`` the loss gains ``-lam_entropy * mean_b H(p^d_b)`` for the dominant modality
``d`` (highest ``s_m``), i.e. its prototype distribution is pushed toward higher entropy.

Other departures: distances are computed in one vectorised operation (the official ``EU_dist`` is
a Python double loop); for AVE the official code builds prototypes from the whole *validation*
split, which lets validation labels into training, so here they always come from training data.
The MCR authors' port adds a BatchNorm (no affine) on the features before the distances; not here.

Official settings (argument defaults and ``bash.sh``): ``alpha 1``, ``momentum 0.2``, window
0..100 of 150 epochs, SGD (momentum 0.9, weight decay 1e-4), StepLR(70, 0.1), batch 64; AVE
(``bash.sh``) ``alpha 2``, ``momentum 0``, window 0..70 of 130 epochs, lr 1e-3.

Cost: one no-grad pass over ``fraction`` of the training split per epoch, plus ``B x C`` distances
per modality and step. Under DDP the scores are summed over ranks so every rank picks the same
weak modality. Logged per step: ``score_<m>``, ``weight_<m>``; per epoch: nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, EpochContext, Method, StepContext
from mmbalance.models.output import ModelOutput


def class_means(latents: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(C, d)`` mean latent per class and ``(C,)`` the class counts (rows of absent classes
    are 0)."""
    idx = targets.long()
    sums = latents.new_zeros((num_classes, latents.shape[1])).index_add_(0, idx, latents)
    counts = torch.bincount(idx, minlength=num_classes).to(latents.dtype)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def update_prototypes(
    old: Tensor | None, latents: Tensor, targets: Tensor, num_classes: int, momentum: float
) -> Tensor:
    """New prototypes from ``latents``: class means, EMA'd into ``old`` (``(1 - mu) new + mu old``)
    when there are old ones; classes absent from ``targets`` keep their old prototype (or, at the
    first computation, get the mean of all latents)."""
    means, counts = class_means(latents, targets, num_classes)
    present = (counts > 0).unsqueeze(1)
    if old is None:
        return torch.where(present, means, latents.mean(0, keepdim=True))
    old = old.to(means.device, means.dtype)
    return torch.where(present, (1 - momentum) * means + momentum * old, old)


def prototype_distances(latents: Tensor, prototypes: Tensor) -> Tensor:
    """``(B, C)`` Euclidean distances ``||z_b - c_k||_2`` (differentiable in ``latents``; the
    square root is taken of at least 1e-12 so a latent on a prototype has a finite gradient)."""
    diff = latents.unsqueeze(1) - prototypes.to(latents.device, latents.dtype).unsqueeze(0)
    return diff.square().sum(-1).clamp_min(1e-12).sqrt()


def prototype_scores(distances: Mapping[str, Tensor], targets: Tensor) -> Tensor:
    """``(M,)`` batch sums of ``softmax(-d^m)[y]``, no graph."""
    with torch.no_grad():
        idx = targets.long().unsqueeze(1)
        return torch.stack([(-d).softmax(-1).gather(1, idx).sum() for d in distances.values()])


def weak_modalities(scores: Tensor) -> Tensor:
    """``(M,)`` 1.0 where ``s_m`` is below the mean of the other scores, else 0.0 (two
    modalities: the official ``rho = s_a / s_v`` rule)."""
    m = scores.shape[0]
    others = (scores.sum() - scores) / (m - 1)
    return (scores < others).to(scores.dtype)


def prototype_entropy(distances: Tensor) -> Tensor:
    """Mean over the batch of the entropy of ``softmax(-d)``."""
    logp = F.log_softmax(-distances, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclass
class PMRParams:
    """PMR options.

    Attributes:
        alpha: weight of the weak modality's prototype cross-entropy.
        momentum: momentum of the prototypes' moving average (0: the newest class means only).
        fraction: part of the training split the prototypes are computed from each epoch.
        start: first epoch of the modulation window.
        end: last epoch of the modulation window, inclusive (null: to the last epoch).
        lam_entropy: weight of the paper's prototypical entropy regularisation (0: off, as in
            the official code).
        entropy_epochs: the entropy term acts during this many first epochs.
        ema_start_epoch: the first epoch whose prototypes are a moving average of the new class
            means and the previous prototypes (official 2: its average starts in the third
            epoch; 1: from the second computation on).
    """

    alpha: float = 1.0
    momentum: float = 0.2
    fraction: float = 0.1
    start: int = 0
    end: int | None = None
    lam_entropy: float = 0.0
    entropy_epochs: int = 0
    ema_start_epoch: int = 2

    def __post_init__(self) -> None:
        check(self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}")
        check(0 <= self.momentum < 1, f"method.momentum must be in [0, 1), got {self.momentum}")
        check(0 < self.fraction <= 1, f"method.fraction must be in (0, 1], got {self.fraction}")
        check(self.start >= 0, f"method.start must be >= 0, got {self.start}")
        check(
            self.end is None or self.end >= self.start,
            f"method.end must be >= method.start ({self.start}) or null, got {self.end}",
        )
        check(self.lam_entropy >= 0, f"method.lam_entropy must be >= 0, got {self.lam_entropy}")
        check(
            self.entropy_epochs >= 0,
            f"method.entropy_epochs must be >= 0, got {self.entropy_epochs}",
        )
        check(
            self.ema_start_epoch >= 1,
            f"method.ema_start_epoch must be >= 1, got {self.ema_start_epoch}",
        )

    def active(self, epoch: int) -> bool:
        return self.start <= epoch and (self.end is None or epoch <= self.end)


@METHODS.register("pmr")
class PMR(Method):
    """Prototypical Modal Rebalance (CVPR 2023): class prototypes per modality; the weaker
    modality also minimises a prototype cross-entropy."""

    name = "pmr"
    tasks = ("classification",)
    Params = PMRParams
    search_space = ("method.alpha", (0.5, 1.0, 2.0))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        cls.refuse_late_start(params.start, epochs)

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.prototypes: dict[str, Tensor] = {}

    def on_epoch_start(self, ctx: EpochContext) -> None:
        features = ctx.features("train", self.params.fraction)
        if self.info is None:
            raise ConfigError("method 'pmr' was not set up (call setup before the epoch hooks)")
        # before ema_start_epoch the new class means replace the prototypes (momentum 0)
        averaging = ctx.epoch >= self.params.ema_start_epoch
        momentum = self.params.momentum if averaging else 0.0
        for m in self.info.modalities:
            self.prototypes[m] = update_prototypes(
                self.prototypes.get(m),
                features.latents[m].float(),
                features.targets,
                self.info.num_outputs,
                momentum,
            )

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        terms = {"task": ctx.task_loss(output.logits)}
        p = self.params
        entropy_on = p.lam_entropy > 0 and ctx.epoch < p.entropy_epochs
        if not (p.active(ctx.epoch) or entropy_on):
            return terms
        if set(self.prototypes) != set(output.latents):
            raise ConfigError(
                "method 'pmr' has no prototypes yet: on_epoch_start must run before the steps"
            )
        distances = {
            m: prototype_distances(z, self.prototypes[m]) for m, z in output.latents.items()
        }
        scores = prototype_scores(distances, ctx.targets)
        if ctx.world_size > 1:
            scores = ctx.all_reduce(scores)
        for i, m in enumerate(distances):
            ctx.log(f"score_{m}", scores[i])
        if p.active(ctx.epoch) and p.alpha > 0:
            weights = p.alpha * weak_modalities(scores)
            pce = torch.stack([F.cross_entropy(-d, ctx.targets) for d in distances.values()])
            terms["prototype"] = (weights.to(pce.dtype) * pce).sum()
            for i, m in enumerate(distances):
                ctx.log(f"weight_{m}", weights[i])
        if entropy_on:
            dominant = torch.nn.functional.one_hot(scores.argmax(), len(distances))
            entropy = torch.stack([prototype_entropy(d) for d in distances.values()])
            terms["entropy"] = -p.lam_entropy * (dominant.to(entropy.dtype) * entropy).sum()
        return terms

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": {m: c.detach().cpu().clone() for m, c in self.prototypes.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prototypes = {m: c for m, c in state["prototypes"].items()}
