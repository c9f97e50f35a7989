"""AUG: sustained boosting of the weaker modality's classifier (Jiang, Huang, Yang, NeurIPS 2025,
"Rethinking Multimodal Learning from the Perspective of Mitigating Classification Ability
Disproportion"; official code njustkmg/NeurIPS25-AUG @841d079, ``train_CREMAD.py`` and
``model/AudioVideo.py``).

Model. Each modality ``m`` keeps its encoder and gets a growing stack of classifiers on its latent
``z_m``: a base classifier and the ones added during training, each ``ReLU(Linear_t(z_m))`` into
a hidden layer (``hidden_dim``, official 256) followed by one output layer ``W`` that every
classifier of every modality shares. With ``n`` added classifiers the modality's logits are
``o_m = sum_{t=0..n} W ReLU(Linear_t(z_m))``.

Training alternates between the modalities inside every batch (:meth:`AUG.step_parts`): one part
per modality, each a forward of that modality alone, a backward and an optimizer step. A
modality without added classifiers minimises ``CE(o_m, y)``. With ``n >= 1``, writing
``prev = sum_{t<n}`` (every classifier but the newest) and ``last`` the newest::

    L_m = CE(o_m, y) + CE(prev, y) + CE(last, y_res),   y_res = y - lambda * y * softmax(prev)

(``lambda``: ``residual_weight``, official 0.5; ``softmax(prev)`` without gradient). ``y_res`` is a
soft target whose only entry is the true class's, ``1 - lambda p_prev[y]``: the newest classifier
learns the part of the label the earlier ones have not fitted (the boosting residual).

Adaptive classifier assignment, at the end of epoch 0 and of every epoch ``e`` with
``(e + 1) % check_every == 0``: ``s_m`` is the sum over the epoch's training steps of
``softmax(o_m)[y]`` (computed in modality ``m``'s part). For the modality with the lowest score,
``w``, with ``r = mean_{k != w} s_k / s_w``: if ``r > sigma + tau`` (``score_ratio``, official
``--lam`` 1; ``margin``, 0.01) a classifier is added to ``w``, initialised as the official
``add_layer`` does (Xavier-normal weight, zero bias).

Prediction: ``sum_m a_m o_m`` with ``a`` = ``modality_weights`` (official ``merge_alpha`` 0.4
for audio and 0.6 for video; default: ``1/M`` each).

The added classifiers are parameters of the method's module, which grows (``grows_module``): the
training loop gives every new classifier to the optimizer right after the epoch hook that added
it, and checkpoints record how many classifiers each modality has
(:meth:`AUG.module_layout`), so a run killed after any epoch resumes exactly and the selected
weights are evaluated with the classifiers they had when they were scored.

Where this departs from the official code, and why:

- **The added classifiers train.** The official ``add_layer`` creates the new ``nn.Linear``
  after ``optim.SGD(model.parameters())`` is built and never adds it to the optimizer, so every
  added classifier stays at its Xavier initialisation (only the shared output layer and the
  encoder learn through it). Here each one joins the optimizer when it is added, as the paper's
  boosting needs.
- **Selection on validation.** The official loop keeps the epoch of the best test accuracy; here
  the validation split selects (the trainer's rule for every method).
- **Any number of modalities, a symmetric rule.** The official rule compares ``s_a / s_v`` with
  ``1 + 0.01`` (then a classifier goes to video) and ``1 - 0.01`` (to audio), which is not
  symmetric in the two modalities; here the weakest modality's ratio is compared with
  ``sigma + tau`` whatever its position. For two modalities the two rules differ only when
  ``s_a / s_v`` lies between ``1 / 1.01`` and ``0.99``.
- **One optimizer step moves only what its part trained.** Under the PyTorch 1.11 the official
  README pins, ``zero_grad()`` zeroes rather than frees gradients, so in the official video step
  the audio encoder and classifiers take a second momentum-and-weight-decay step with a zero
  gradient; here each part's step updates the parameters that received a gradient in that part
  (the shared output layer in every part, as in the official code).
- ``check_every`` is an option (default 1); the official code checks every ``epochs / 10``
  epochs (20 of 200), which the shipped CREMA-D config sets.

Official settings (CREMA-D, ``data/crema.json``): SGD lr 1e-2, momentum 0.9, weight decay 1e-4,
StepLR(70, 0.1), batch 64, 200 epochs, ResNet-18 encoders from scratch. Classification only.
Logged per step: nothing; per epoch: ``score_<m>`` and ``classifiers_<m>`` (after the check).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, EpochContext, ModelInfo, StepContext
from mmbalance.methods.ops.one_modality_per_part import OneModalityPerPart
from mmbalance.models.output import ModelOutput


def _xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class BoostedClassifiers(nn.Module):
    """Every modality's classifiers: a base ``Linear(d_m, hidden)`` per modality, the added ones
    (``added[m]``, one ``Linear(d_m, hidden)`` each), and one output layer ``Linear(hidden, C)``
    shared by all of them."""

    def __init__(self, latent_dims: Mapping[str, int], hidden_dim: int, num_outputs: int) -> None:
        super().__init__()
        self.latent_dims = dict(latent_dims)
        self.hidden_dim = hidden_dim
        self.base = nn.ModuleDict(
            {m: _xavier_linear(d, hidden_dim) for m, d in latent_dims.items()}
        )
        self.added = nn.ModuleDict({m: nn.ModuleList() for m in latent_dims})
        self.out = _xavier_linear(hidden_dim, num_outputs)

    def terms(self, modality: str, z: Tensor) -> list[Tensor]:
        """The logits of each classifier of ``modality`` on ``z``, base first, newest last."""
        layers = [self.base[modality], *self.added[modality]]
        return [self.out(F.relu(layer(z))) for layer in layers]

    def add(self, modality: str, initialise: bool = True) -> nn.Linear:
        """Append a classifier to ``modality`` (Xavier-normal weight and zero bias, or zeros when
        saved weights will replace it), on the device and in the dtype of the module."""
        d = self.latent_dims[modality]
        if initialise:
            layer = _xavier_linear(d, self.hidden_dim)
        else:
            layer = nn.Linear(d, self.hidden_dim)
            with torch.no_grad():
                layer.weight.zero_()
                layer.bias.zero_()
        layer = layer.to(device=self.out.weight.device, dtype=self.out.weight.dtype)
        self.added[modality].append(layer)
        return layer

    def counts(self) -> dict[str, int]:
        """How many classifiers were added to each modality."""
        return {m: len(layers) for m, layers in self.added.items()}


def boosting_loss(terms: Sequence[Tensor], targets: Tensor, residual_weight: float) -> Tensor:
    """AUG's loss of one modality from its classifiers' logits (base first): ``CE(sum, y)``
    alone without added classifiers, else ``CE(sum, y) + CE(prev, y) + CE(last, y_res)`` with
    ``y_res = y - lambda * y * softmax(prev)`` (no gradient through ``softmax(prev)``)."""
    total = torch.stack(list(terms)).sum(0)
    loss = F.cross_entropy(total, targets)
    if len(terms) == 1:
        return loss
    prev = torch.stack(list(terms[:-1])).sum(0)
    idx = targets.long().unsqueeze(1)
    confidence = prev.detach().float().softmax(-1).gather(1, idx).squeeze(1)
    residual = 1.0 - residual_weight * confidence  # the only non-zero entry of y_res
    log_q = terms[-1].float().log_softmax(-1).gather(1, idx).squeeze(1)
    return loss + F.cross_entropy(prev, targets) - (residual * log_q).mean()


def classifier_to_add(scores: Mapping[str, float], score_ratio: float, margin: float) -> str | None:
    """The modality that gets a classifier: the one with the lowest score ``s_w``, when the mean
    of the others' scores over ``s_w`` exceeds ``score_ratio + margin``; else ``None``."""
    weakest = min(scores, key=lambda m: scores[m])
    others = [s for m, s in scores.items() if m != weakest]
    if scores[weakest] <= 0:
        return weakest if max(others) > 0 else None
    ratio = (sum(others) / len(others)) / scores[weakest]
    return weakest if ratio > score_ratio + margin else None


@dataclass
class AUGParams:
    """AUG options.

    Attributes:
        hidden_dim: width of every classifier's hidden layer (official 256).
        residual_weight: ``lambda`` of the residual label ``y - lambda y softmax(prev)`` that the
            newest classifier fits (official 0.5).
        score_ratio: ``sigma``: a classifier is added to the weakest modality when the mean of
            the other modalities' epoch scores over its own exceeds ``sigma + margin`` (official
            ``--lam`` 1).
        margin: ``tau`` of that rule (official 0.01).
        check_every: the assignment runs after epoch 0 and after every epoch ``e`` with
            ``(e + 1) % check_every == 0`` (official: a tenth of the epochs, 20 of 200).
        modality_weights: the weight of each modality's logits in the prediction, in the
            model's modality order (official ``merge_alpha``: 0.4 audio, 0.6 video); null:
            ``1 / M`` each.
    """

    hidden_dim: int = 256
    residual_weight: float = 0.5
    score_ratio: float = 1.0
    margin: float = 0.01
    check_every: int = 1
    modality_weights: list[float] | None = None

    def __post_init__(self) -> None:
        check(self.hidden_dim >= 1, f"method.hidden_dim must be >= 1, got {self.hidden_dim}")
        check(
            0 <= self.residual_weight <= 1,
            f"method.residual_weight must be in [0, 1], got {self.residual_weight}",
        )
        check(self.score_ratio > 0, f"method.score_ratio must be > 0, got {self.score_ratio}")
        check(self.margin >= 0, f"method.margin must be >= 0, got {self.margin}")
        check(self.check_every >= 1, f"method.check_every must be >= 1, got {self.check_every}")
        check(
            self.modality_weights is None or all(w >= 0 for w in self.modality_weights),
            f"method.modality_weights must be >= 0, got {self.modality_weights}",
        )


@METHODS.register("aug")
class AUG(OneModalityPerPart):
    """Sustained boosting: alternating unimodal steps through classifiers that grow for the
    modality whose training confidence lags."""

    name = "aug"
    Params = AUGParams
    grows_module = True
    missing_modality = "its classifiers' logits left out of the weighted sum"
    search_space = ("method.residual_weight", (0.25, 0.5, 1.0))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        if epochs < 2:
            cls.refuse_idle_schedule(
                "after epoch 0, when its first classifier can be added (it trains from epoch 1)",
                epochs,
                "raise train.epochs",
            )

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.head: BoostedClassifiers | None = None
        self._scores: dict[str, Tensor] = {}  # the epoch's training scores, by modality

    def setup(self, info: ModelInfo) -> nn.Module:
        super().setup(info)
        if info.task != "classification":
            raise ConfigError(f"method 'aug' needs a classification task, got {info.task!r}")
        weights = self.params.modality_weights
        if weights is not None and len(weights) != len(info.modalities):
            raise ConfigError(
                f"method.modality_weights has {len(weights)} values for the "
                f"{len(info.modalities)} modalities {list(info.modalities)}"
            )
        self.head = BoostedClassifiers(info.latent_dims, self.params.hidden_dim, info.num_outputs)
        return self.head

    def _require_head(self) -> BoostedClassifiers:
        if self.head is None:
            raise RuntimeError("call setup() before training or evaluating AUG")
        return self.head

    # --- the alternating step (its parts and encoding: OneModalityPerPart) --------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        head = self._require_head()
        m = ctx.part
        if m is None:
            raise ConfigError("AUG trains one modality per part (ctx.part is None)")
        terms = head.terms(m, output.latents[m])
        with torch.no_grad():
            total = torch.stack(terms).sum(0).float()
            score = total.softmax(-1).gather(1, ctx.targets.long().unsqueeze(1)).sum()
            self._scores[m] = self._scores.get(m, torch.zeros_like(score)) + score
        return {f"uni_{m}": boosting_loss(terms, ctx.targets, self.params.residual_weight)}

    # --- epochs -----------------------------------------------------------------------------------
    def on_epoch_start(self, ctx: EpochContext) -> None:
        self._scores = {}

    def on_epoch_end(self, ctx: EpochContext) -> None:
        head = self._require_head()
        assert self.info is not None
        scores = {}
        for m in self.info.modalities:
            value = self._scores.get(m)
            value = torch.zeros(()) if value is None else value
            if ctx.world_size > 1:
                value = ctx.all_reduce(value)
            scores[m] = float(value)
            ctx.log(f"score_{m}", scores[m])
        self._scores = {}
        if ctx.epoch == 0 or (ctx.epoch + 1) % self.params.check_every == 0:
            chosen = classifier_to_add(scores, self.params.score_ratio, self.params.margin)
            if chosen is not None:
                head.add(chosen)
        for m, n in head.counts().items():
            ctx.log(f"classifiers_{m}", 1 + n)

    # --- inference --------------------------------------------------------------------------------
    def modality_logits(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's logits ``o_m``: the sum of its classifiers."""
        head = self._require_head()
        return {m: torch.stack(head.terms(m, z)).sum(0) for m, z in latents.items()}

    def predict(self, output: ModelOutput) -> Tensor:
        return self._weighted(self.modality_logits(output.latents), {})

    def predict_missing(
        self,
        heads: Callable[[Mapping[str, Tensor]], ModelOutput],
        latents: Mapping[str, Tensor],
        missing: Mapping[str, Tensor],
    ) -> Tensor:
        """A missing modality's classifiers are left out of the weighted sum for the samples
        that lack it (the others keep their weights)."""
        return self._weighted(self.modality_logits(latents), missing)

    def _weighted(self, logits: Mapping[str, Tensor], missing: Mapping[str, Tensor]) -> Tensor:
        weights = self.params.modality_weights
        if weights is None:
            weights = [1.0 / len(logits)] * len(logits)
        terms = []
        for w, (m, o) in zip(weights, logits.items(), strict=True):
            term = w * o
            if m in missing:
                term = term.masked_fill(missing[m].reshape(-1, 1), 0.0)
            terms.append(term)
        return torch.stack(terms).sum(0)

    # --- the growing module -------------------------------------------------------------------------
    def module_layout(self) -> dict[str, Any]:
        return {"added": self._require_head().counts()}

    def restore_module_layout(self, layout: Mapping[str, Any]) -> None:
        head = self._require_head()
        added = layout.get("added")
        if not isinstance(added, Mapping) or set(added) != set(head.added):
            raise ValueError(f"an AUG layout names the modalities of another model: {layout}")
        for m, n in added.items():
            layers = head.added[m]
            while len(layers) > int(n):
                del layers[len(layers) - 1]
            while len(layers) < int(n):
                head.add(m, initialise=False)
