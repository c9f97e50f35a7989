"""D&R: Diagnosing and Re-learning (Wei, Li, Hu, ECCV 2024, "Diagnosing and Re-learning for
Balanced Multimodal Learning").

Training is plain joint training (one task loss on the fused output). The initial encoder
weights ``theta0_m`` are kept. Every ``reinit_epoch`` epochs (at most ``reinit_num`` times) each
encoder is **diagnosed** and softly **re-initialised**:

- its pooled latents on the training split and on the validation split (eval mode, no
  gradient) are scaled to ``[-1, 1]`` per feature (min-max, fitted on that set) and clustered by
  k-means into ``C`` clusters (``C`` = number of classes); the **purity** of a clustering is
  ``sum over clusters of the count of its majority label / N``;
- the gap ``g_m = |P_train - P_val|`` measures how much the encoder's representation overfits
  (a well-learnt, dominant modality has a large gap);
- ``w_m = tanh(move_lambda * g_m)`` and every encoder parameter moves to
  ``theta_m <- w_m * theta0_m + (1 - w_m) * theta_m``.

Batch-norm running statistics, the fusion head and the optimizer state are untouched (as in the
official code). Re-learning happens *before* the epoch that follows a multiple of
``reinit_epoch`` (0-based: after epochs 20, 40, 60 with the official ``reinit_epoch=20``), which
is when the official code does it (after that epoch's training and evaluation). It runs in
:meth:`on_epoch_start` rather than :meth:`on_epoch_end` so that the weights the trainer selects
on validation at the end of an epoch are the weights that were validated.

The initial weights are taken in :meth:`on_train_start` (after any unimodal pre-training) and kept
in :meth:`state_dict`, so a resumed run re-initialises towards the same ``theta0``.

The diagnosis reads the ``train`` and ``val`` splits only, never test.

Official code: GeWu-Lab/Diagnosing_Relearning_ECCV2024 @025085e (``code/ours.py``). Followed:
the purity gap, ``tanh(lambda * g)``, the soft re-initialisation of all encoder parameters, the
schedule, ``MinMaxScaler((-1, 1))`` and ``KMeans(C, random_state=0)`` (scikit-learn; ``n_init``
10, the library default when the code was released). Known faults, none of which is reproduced:

- the official code is leak-free in its diagnosis (its ``val.csv`` is a part of the original
  training list), but it reports the best *test* epoch, and its loader augments only in mode
  ``'train'`` while D&R trains in mode ``'my_train'``: it trains without augmentation (fixed
  centre frames), and its training features come from that pipeline too;
- BalanceBenchmark's port (``ReLearning``) diagnoses on the test features (its validation split
  is the test split);
- the MCR authors' port (kkontras/MCR ``Bias_Infusion_DnR``) compares one modality's training
  purity with the *other* modality's validation purity (its "val_audio" features are the visual
  ones).

Official settings (``script/ours.sh``, CREMA-D): ``move_lambda`` 3, ``reinit_epoch`` 20,
``reinit_num`` 3, 90 epochs, SGD lr 2e-3, momentum 0.9, weight decay 1e-4, batch 64, concat
head, no learning-rate schedule. BalanceBenchmark: ``reinit_epoch`` 15, ``reinit_num`` 2. The
defaults here (``reinit_epoch`` 4, ``reinit_num`` 3, ``move_lambda`` 3) are the MCR authors' port
settings, the ones behind the MCR paper's Table 1, and re-learn within short runs too; the
official schedule is in ``configs/dr/``.

Cost: joint training, plus at each of the ``reinit_num`` diagnoses one no-grad pass over the
training and validation splits and ``2M`` k-means fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.methods.base import METHODS, EpochContext, Method


@dataclass
class DRParams:
    """D&R options.

    Attributes:
        reinit_epoch: diagnose and re-learn every this many epochs (E_r).
        reinit_num: at most this many times (N_r).
        move_lambda: strength lambda of the re-initialisation w = tanh(lambda * gap).
        kmeans_seed: random_state of the k-means clustering behind the purity.
        kmeans_n_init: restarts of the k-means clustering.
    """

    reinit_epoch: int = 4
    reinit_num: int = 3
    move_lambda: float = 3.0
    kmeans_seed: int = 0
    kmeans_n_init: int = 10

    def __post_init__(self) -> None:
        check(self.reinit_epoch >= 1, f"method.reinit_epoch must be >= 1, got {self.reinit_epoch}")
        check(self.reinit_num >= 0, f"method.reinit_num must be >= 0, got {self.reinit_num}")
        check(self.move_lambda >= 0, f"method.move_lambda must be >= 0, got {self.move_lambda}")
        check(
            self.kmeans_n_init >= 1, f"method.kmeans_n_init must be >= 1, got {self.kmeans_n_init}"
        )


# --- the diagnosis -------------------------------------------------------------------------------
def minmax_scale(x: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Scale every column of ``x`` to ``[low, high]`` (scikit-learn's ``MinMaxScaler``: a
    constant column maps to ``low``)."""
    lo = x.min(0).values
    span = x.max(0).values - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (x - lo) / span * (high - low) + low


def purity(labels: Tensor, clusters: Tensor) -> float:
    """Clustering purity: the fraction of samples that carry their cluster's majority label."""
    if labels.shape != clusters.shape or labels.dim() != 1 or len(labels) == 0:
        raise ValueError("labels and clusters must be non-empty 1-D tensors of equal length")
    labels = torch.unique(labels.long(), return_inverse=True)[1]
    clusters = torch.unique(clusters.long(), return_inverse=True)[1]
    n_labels, n_clusters = int(labels.max()) + 1, int(clusters.max()) + 1
    counts = torch.bincount(clusters * n_labels + labels, minlength=n_clusters * n_labels)
    return float(counts.view(n_clusters, n_labels).max(1).values.sum()) / len(labels)


def cluster(features: Tensor, num_clusters: int, seed: int, n_init: int) -> Tensor:
    """k-means cluster of every row of ``features`` after min-max scaling to ``[-1, 1]``."""
    scaled = minmax_scale(features.detach().float().cpu()).numpy().astype(np.float32)
    k = min(num_clusters, len(scaled))
    with threadpool_limits(limits=torch.get_num_threads()):  # not every core (see eval.probe)
        fitted = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(scaled)
    return torch.from_numpy(fitted.astype(np.int64))


def purity_gap(
    train: Tensor,
    train_labels: Tensor,
    val: Tensor,
    val_labels: Tensor,
    num_clusters: int,
    seed: int = 0,
    n_init: int = 10,
) -> tuple[float, float]:
    """``(P_train, P_val)``: k-means purity of one encoder's training and validation latents."""
    p_train = purity(train_labels.cpu(), cluster(train, num_clusters, seed, n_init))
    p_val = purity(val_labels.cpu(), cluster(val, num_clusters, seed, n_init))
    return p_train, p_val


def reinit_strength(gap: float, move_lambda: float) -> float:
    """``w = tanh(move_lambda * gap)``."""
    return math.tanh(move_lambda * gap)


@torch.no_grad()
def soft_reinit(params: Sequence[nn.Parameter], initial: Sequence[Tensor], w: float) -> None:
    """``theta <- w * theta0 + (1 - w) * theta`` for every parameter, in place."""
    if len(params) != len(initial):
        raise ValueError(f"{len(params)} parameters but {len(initial)} initial tensors")
    for p, p0 in zip(params, initial, strict=True):
        p.copy_(w * p0.to(p.device, p.dtype) + (1 - w) * p)


# --- the method ----------------------------------------------------------------------------------
@METHODS.register("dr")
class DiagnosingRelearning(Method):
    """D&R (ECCV 2024): re-initialise each encoder softly by its train/val k-means purity gap."""

    name = "dr"
    tasks = ("classification",)
    Params = DRParams
    search_space = ("method.move_lambda", (1.0, 3.0, 6.0))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        # the first re-learning happens before epoch reinit_epoch (0-based)
        if params.reinit_num == 0 or params.reinit_epoch >= epochs:
            cls.refuse_idle_schedule(
                f"before epoch {params.reinit_epoch} (0-based; reinit_epoch="
                f"{params.reinit_epoch}, reinit_num={params.reinit_num})",
                epochs,
                "lower method.reinit_epoch, make method.reinit_num >= 1 or raise train.epochs",
            )

    def __init__(self, params: DRParams | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._initial: dict[str, list[Tensor]] | None = None

    def relearns_before(self, epoch: int) -> bool:
        """Whether re-learning happens before ``epoch`` (after epoch ``epoch - 1``)."""
        p = self.params
        done = epoch - 1
        return done > 0 and done % p.reinit_epoch == 0 and done // p.reinit_epoch <= p.reinit_num

    def on_train_start(self, ctx: EpochContext) -> None:
        self._initial = {
            m: [p.detach().clone() for p in params] for m, params in ctx.encoder_params.items()
        }

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if not self.relearns_before(ctx.epoch):
            return
        if self._initial is None:
            raise RuntimeError("dr: no initial weights (on_train_start did not run)")
        if self.info is None:
            raise RuntimeError("dr: setup() must run before training")
        p = self.params
        train, val = ctx.features("train"), ctx.features("val")
        for m, params in ctx.encoder_params.items():
            p_train, p_val = purity_gap(
                train.latents[m],
                train.targets,
                val.latents[m],
                val.targets,
                self.info.num_outputs,
                p.kmeans_seed,
                p.kmeans_n_init,
            )
            w = reinit_strength(abs(p_train - p_val), p.move_lambda)
            soft_reinit(params, self._initial[m], w)
            ctx.log(f"purity_train_{m}", p_train)
            ctx.log(f"purity_val_{m}", p_val)
            ctx.log(f"reinit_weight_{m}", w)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._initial is None else {"initial": self._initial}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        initial = state.get("initial")
        self._initial = None if initial is None else {m: list(v) for m, v in initial.items()}
