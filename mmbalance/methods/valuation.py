"""Modality valuation: sample-level Shapley values of each modality and re-presentation of the
samples a modality contributes little to (Wei, Feng, Chen, Hu, CVPR 2024, "Enhancing multimodal
cooperation via sample-level modality valuation"; official code
GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, ``sample_level.py``, ``modality_level.py``).

Valuation (at the end of every epoch from ``warmup_epochs - 1`` on, on the training split, with
:attr:`~mmbalance.methods.base.EpochContext.features`): for each training sample and each coalition
``S`` of modalities, the fusion head is evaluated with the latents of the modalities outside ``S``
set to zero, and the coalition's value is ``v(S) = |S| * [argmax f(z_S) = y]`` (``v({}) = 0``;
the official code's ``value_all = 2``, ``value_a = value_v = 1`` for two modalities). Each
modality's per-sample Shapley value is

    phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S)),

for two modalities ``phi_a = (v(a) + v(ab) - v(b)) / 2`` (the official closed form); any number
of modalities by enumerating the ``2^M - 1`` coalitions (``2^M - 1`` fusion-head evaluations on
the cached latents, no extra encoder pass).

Re-presentation (``level``):

- ``sample`` (``sample_level.py``): sample ``i`` gets ``c_im`` extra copies in which only modality
  ``m`` is kept (the others' latents zeroed): 3 if ``phi_m < -0.1``, 2 if ``-0.1 <= phi_m < 0.4``,
  1 if ``0.4 <= phi_m < 0.9``, else 0 (``thresholds``; the official bounds are strict on both
  sides, which differs only at exact equality, impossible for M <= 3 where ``phi`` is a multiple
  of 1/6). BalanceBenchmark's upper bound 1 instead of 0.9 gives the same copies for M = 2, where
  ``phi`` is a multiple of 1/2.
- ``modality`` (``modality_level.py``): the mean Shapley value ``c_m`` of each modality over a
  random ``part_ratio`` subset of the training samples (drawn with replacement, as the official
  ``np.random.choice``), gaps ``g_m = 1 - c_m``; ``int(2/3 * alpha * (max g - min g) * N)`` samples
  drawn with replacement get one copy each in which only the modality with the largest gap (the
  least contributing) is kept. For two modalities this is the official ``|g_a - g_v| * 2 / 3``.

How the resampling is realised, and where it departs from the official code: the official code
builds a new, larger training set every epoch (the original samples plus the copies, shuffled
together) and zeroes the dropped modalities' *features* of each copy. Here the training set is
unchanged and each batch adds, for its samples with copies, the loss terms
``copy_m = sum_i c_im CE(f(z_i with only m kept), y_i) / B``, on the latents the batch already
computed (zeroed after the encoders, as the official ``drop`` does, so no extra encoder pass).
Over an epoch every copy contributes its cross-entropy exactly once with the weight ``1/B`` it
has in the official batches, so the epoch's summed gradient is the official one; the differences
are that a copy shares its batch with its original (the official copies are shuffled, re-augmented
and see other batch-norm statistics) and that an epoch has ``N/B`` optimizer steps instead of
``(N + copies)/B``. The official code computes the valuation before validating an epoch; here it
runs right after (the weights are the same). The random subset and draws are seeded by ``seed`` and
the epoch, so a resumed run draws the same; the copies are part of the method's state.

Official settings (Kinetics-Sounds): Adam lr 5e-5 (sample level) / SGD lr 1e-3 (modality level),
weight decay 1e-4, StepLR(30, 0.1), batch 64, 60 epochs, 5 warm-up epochs, ``part_ratio`` 0.2,
``alpha`` 1; ResNet-18s from scratch, concat head. BalanceBenchmark: one warm-up epoch
(``modulation_starts 1``), modality level by default. Logged per epoch: ``shapley_<m>`` (train
mean) and ``copies_<m>``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, EpochContext, Method, StepContext
from mmbalance.models.output import FusionOutput, ModelOutput

Fusion = Callable[[Mapping[str, Tensor], Sequence[str]], FusionOutput]


def keep_only(latents: Mapping[str, Tensor], kept: Sequence[str]) -> dict[str, Tensor]:
    """The latents with every modality outside ``kept`` set to zero."""
    return {m: z if m in kept else torch.zeros_like(z) for m, z in latents.items()}


def coalition_values(
    fusion: Fusion, latents: Mapping[str, Tensor], targets: Tensor
) -> dict[frozenset[str], Tensor]:
    """Per-sample values ``v(S) = |S| * [argmax f(z_S) = y]`` of every non-empty coalition."""
    modalities = list(latents)
    values: dict[frozenset[str], Tensor] = {}
    for r in range(1, len(modalities) + 1):
        for coalition in itertools.combinations(modalities, r):
            logits = fusion(keep_only(latents, coalition), ()).logits
            correct = (logits.argmax(-1) == targets).float()
            values[frozenset(coalition)] = r * correct
    return values


def shapley_values(
    values: Mapping[frozenset[str], Tensor], modalities: Sequence[str]
) -> dict[str, Tensor]:
    """Per-sample Shapley values from per-sample coalition values (``v({}) = 0``)."""
    n = len(modalities)
    phi: dict[str, Tensor] = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total: Tensor | float = 0.0
        for r in range(n):
            weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, r):
                s = frozenset(coalition)
                without = values[s] if s else 0.0
                total = total + weight * (values[s | {m}] - without)
        phi[m] = torch.as_tensor(total)
    return phi


def sample_copies(phi: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Copies per sample for one modality: 3 below ``t0``, 2 in ``[t0, t1)``, 1 in ``[t1, t2)``,
    0 from ``t2`` on."""
    t0, t1, t2 = thresholds
    copies = torch.zeros_like(phi, dtype=torch.long)
    copies[phi < t2] = 1
    copies[phi < t1] = 2
    copies[phi < t0] = 3
    return copies


def modality_copies(
    phi: Mapping[str, Tensor], part_ratio: float, alpha: float, generator: torch.Generator
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The modality-level copies ``(N,)`` per modality (all on the least contributing one) and
    the subset means ``c_m`` they come from."""
    modalities = list(phi)
    n = len(phi[modalities[0]])
    part = torch.randint(n, (max(1, int(n * part_ratio)),), generator=generator)
    means = {m: float(phi[m].cpu()[part].mean()) for m in modalities}
    gaps = {m: 1.0 - c for m, c in means.items()}
    difference = (max(gaps.values()) - min(gaps.values())) * 2.0 / 3.0 * alpha
    chosen = torch.randint(n, (int(difference * n),), generator=generator)
    kept = max(modalities, key=lambda m: gaps[m])
    copies = {m: torch.zeros(n, dtype=torch.long) for m in modalities}
    copies[kept] = torch.bincount(chosen, minlength=n)
    return copies, means


@dataclass
class ValuationParams:
    """Modality-valuation options.

    Attributes:
        level: ``sample`` (copies per sample and modality by Shapley-value thresholds) or
            ``modality`` (copies of random samples keeping the least contributing modality).
        warmup_epochs: epochs of plain training; the valuation at the end of epoch
            ``warmup_epochs - 1`` is the first to act (official 5, BalanceBenchmark 1).
        thresholds: the sample level's bounds ``t0 < t1 < t2``: 3 copies below ``t0``, 2 below
            ``t1``, 1 below ``t2`` (official -0.1, 0.4, 0.9).
        part_ratio: the modality level's share of training samples whose mean Shapley values
            decide the modality (official 0.2).
        alpha: the modality level's strength: ``int(2/3 * alpha * gap difference * N)`` copies.
        seed: seeds the modality level's random draws (with the epoch), so a resumed run draws
            the same.
    """

    level: Literal["sample", "modality"] = "sample"
    warmup_epochs: int = 5
    thresholds: list[float] = field(default_factory=lambda: [-0.1, 0.4, 0.9])
    part_ratio: float = 0.2
    alpha: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check(
            self.warmup_epochs >= 1, f"method.warmup_epochs must be >= 1, got {self.warmup_epochs}"
        )
        check(
            len(self.thresholds) == 3 and list(self.thresholds) == sorted(self.thresholds),
            f"method.thresholds must be 3 increasing numbers, got {self.thresholds}",
        )
        check(
            0 < self.part_ratio <= 1, f"method.part_ratio must be in (0, 1], got {self.part_ratio}"
        )
        check(self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}")


@METHODS.register("valuation")
class Valuation(Method):
    """Per-sample Shapley valuation; low-contribution samples re-presented with one modality."""

    name = "valuation"
    tasks = ("classification",)
    Params = ValuationParams

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.copies: Tensor | None = None  # (dataset size, M) extra copies keeping modality m

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        if params.warmup_epochs >= epochs:  # the first valuation acts in epoch warmup_epochs
            cls.refuse_idle_schedule(
                f"in epoch {params.warmup_epochs} (0-based; warmup_epochs={params.warmup_epochs})",
                epochs,
                "lower method.warmup_epochs or raise train.epochs",
            )

    # --- valuation at epoch boundaries ------------------------------------------------------------
    def on_epoch_end(self, ctx: EpochContext) -> None:
        if ctx.epoch < self.params.warmup_epochs - 1:
            return
        if ctx.model is None:
            raise RuntimeError("valuation needs the model in its EpochContext")
        feats = ctx.features("train")
        fusion = ctx.model.fusion  # type: ignore[union-attr]
        was_training = fusion.training
        fusion.eval()
        with torch.no_grad():
            values = coalition_values(fusion, feats.latents, feats.targets)
        fusion.train(was_training)
        modalities = list(feats.latents)
        phi = {m: v.cpu() for m, v in shapley_values(values, modalities).items()}
        if self.params.level == "sample":
            copies = {m: sample_copies(phi[m], self.params.thresholds) for m in modalities}
        else:
            gen = torch.Generator().manual_seed(self.params.seed * 1_000_003 + ctx.epoch)
            copies, _ = modality_copies(phi, self.params.part_ratio, self.params.alpha, gen)
        index = feats.index.cpu()
        table = torch.zeros(int(index.max()) + 1, len(modalities), dtype=torch.long)
        table[index] = torch.stack([copies[m] for m in modalities], 1)
        self.copies = table
        for j, m in enumerate(modalities):
            ctx.log(f"shapley_{m}", float(phi[m].mean()))
            ctx.log(f"copies_{m}", float(table[:, j].sum()))

    # --- the step -------------------------------------------------------------------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        terms = {"task": ctx.task_loss(output.logits)}
        if self.copies is None:
            return terms
        if ctx.index is None or ctx.fusion is None:
            raise ConfigError("valuation needs the batch's dataset indices and the fusion head")
        index = ctx.index.cpu()
        known = index < len(self.copies)
        counts = torch.zeros(len(index), self.copies.shape[1], dtype=torch.long)
        counts[known] = self.copies[index[known]]
        batch = len(index)
        for j, m in enumerate(output.latents):
            rows = (counts[:, j] > 0).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            device_rows = rows.to(ctx.targets.device)
            sub = {o: z[device_rows] for o, z in output.latents.items()}
            logits = ctx.fusion(keep_only(sub, [m]), ()).logits
            ce = F.cross_entropy(logits, ctx.targets[device_rows], reduction="none")
            weight = counts[rows, j].to(ce.device, ce.dtype)
            terms[f"copy_{m}"] = (weight * ce).sum() / batch
        return terms

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"copies": self.copies}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.copies = state["copies"]
