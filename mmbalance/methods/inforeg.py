"""InfoReg: adaptive unimodal regulation in the prime learning window (Huang, Wei, Yang, Hu,
CVPR 2025; official code GeWu-Lab/InfoReg_CVPR2025, ``main.py``).

The loss is the fused cross-entropy plus one cross-entropy per modality's own logits,
``CE(fused) + lam_uni * sum_m CE(u_m)``. Two signals decide whether a modality is held back:

- **Prime learning window** (per epoch, per modality). The Fisher-information trace of encoder
  ``m`` over an epoch is ``tr_m = sum_tensors mean(sum_steps g^2)``: the squared gradient of every
  weight tensor (every trainable encoder tensor with at least 2 dimensions: the conv kernels and
  linear weights the official code selects) summed over the epoch's steps, averaged over the
  tensor's elements, summed over tensors. With ``bar_t = (sum of the last w traces) / w``
  (``w = window``, 10; fewer than ``w`` traces count the missing ones as 0, as the official
  ``sum(list[-10:]) / 10`` over a list that starts with ten zeros does), the relative increase is
  ``k = (bar_t - bar_{t-1}) / bar_t`` (``k = 1`` before the first trace exists, ``k = 0`` if the
  average is 0). Modality ``m`` is in its prime learning window in an epoch while
  ``k_m > threshold``.
- **Leading modality** (per step). ``s_m = sum_batch softmax(u_m)[y]`` (batch *sums* of the
  true-class probability, all-reduced under DDP); the leader is the modality with the largest
  score, ``gap = s_lead - s_runner_up``. If the leader is in its window, its encoder gets the
  proximal term ``grad += beta (theta - theta_epoch_start)`` with
  ``beta = beta0 * exp(tanh(gap))``: it is pulled back towards where it started the epoch, which
  slows it while the others catch up.

Two official rules (``rule``):

- ``ea7b9d5`` (default; the official HEAD, 2025-11-04): ``u_m`` is modality ``m``'s slice of the
  fused linear head plus ``b / M`` (the official ``v W_v^T + b / 2``), so the unimodal losses train
  the fused head's slices and the scores read them (an additive head is needed: ``late_sum`` or
  ``concat_linear``; the model needs no unimodal heads). The visual branch's condition is fixed
  (``score_a < score_v``) with its own coefficient ``0.1 exp(tanh(gap))``: here ``beta0`` is
  ``beta`` (0.95) for the first modality and ``beta_others`` (0.1) for every other one, and the
  threshold is 0.05.
- ``41d887f`` (2025-03, the code the paper's release shipped): ``u_m`` are separate unimodal heads
  (``unimodal_heads=true``), the threshold is 0.04, and its visual branch repeats the audio
  condition (``elif score_v < score_a`` after ``if score_a > score_v``), so only audio is ever
  regulated. Here whichever modality leads is regulated, every one with ``beta`` (the paper's
  single formula): the repeated condition is a defect the later commit fixed.

Where this departs from the official code, and why (both rules):

- **Per-modality windows.** The official detector uses the audio trace for every decision. Here
  the leader's own trace decides, since the window is a property of how that encoder is learning.
- **Any number of modalities.** The gap is to the runner-up (the official two-modality rule is the
  special case); only the leader is regulated in a step; under ``ea7b9d5`` the first modality
  (audio in the official code) has ``beta`` and the others ``beta_others``.
- The Fisher trace is accumulated after the proximal term is added (as in the official code, which
  squares the final gradients), from the same gradients the optimizer uses; the official code's
  three extra backward passes that only log per-loss gradients are not made.
- The official code decides the window at the epoch's start from the previous epochs' traces, as
  here; ``theta_epoch_start`` is the encoder at the start of the current epoch (the official
  ``deepcopy`` of the model at the start of ``train_epoch``).

Official settings (CREMA-D and Kinetics-Sounds, ``main.py``): SGD lr 2e-3, momentum 0.9, weight
decay 1e-4, batch 64, ResNet-18 encoders, concat head; StepLR(30, 0.1) and 50 epochs at ea7b9d5,
StepLR(40, 0.1) and 80 epochs at 41d887f. Both select on the test set; here validation selects.
Logged per step: ``beta_<m>`` (0 for modalities not regulated); per epoch: ``window_k_<m>`` and
``fisher_trace_<m>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    EpochContext,
    Method,
    ModelInfo,
    StepContext,
)
from mmbalance.methods.ops.discrepancy import score_sums
from mmbalance.methods.ops.modality_logits import modality_logits
from mmbalance.models.output import ModelOutput


def window_k(traces: Sequence[float], window: int) -> float:
    """Relative increase of the ``window``-epoch moving average of a trace sequence:
    ``(bar_t - bar_{t-1}) / bar_t`` with ``bar_t = sum(traces[-window:]) / window`` (missing
    epochs count as 0, as in the official code); 1 while no trace exists yet."""
    if not traces:
        return 1.0
    now = sum(traces[-window:]) / window
    before = sum(traces[-window - 1 : -1]) / window
    if now == 0.0:
        return 0.0
    return (now - before) / now


def proximal_coefficient(gap: float, beta0: float) -> float:
    """``beta = beta0 * exp(tanh(gap))`` for the leader's score lead ``gap``."""
    return beta0 * math.exp(math.tanh(gap))


def leader_and_gap(scores: Tensor) -> tuple[int, float] | None:
    """The index of the modality with the largest score and its lead over the runner-up, or
    ``None`` when the two best scores tie."""
    values = scores.tolist()
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=True)
    gap = values[order[0]] - values[order[1]]
    if gap <= 0:
        return None
    return order[0], gap


Rule = Literal["ea7b9d5", "41d887f"]
#: the window threshold of each official rule
THRESHOLDS: dict[str, float] = {"ea7b9d5": 0.05, "41d887f": 0.04}


@dataclass
class InfoRegParams:
    """InfoReg options.

    Attributes:
        rule: the official rule followed: ``ea7b9d5`` (the official HEAD: scores and unimodal
            losses from the fused head's slices, ``beta_others`` for the modalities after the
            first, threshold 0.05) or ``41d887f`` (the first release: separate unimodal heads,
            one ``beta`` for every modality, threshold 0.04).
        beta: ``beta0`` of the proximal coefficient ``beta0 * exp(tanh(gap))`` of the first
            modality (official 0.95; under ``41d887f``, of every modality).
        beta_others: ``beta0`` of every other modality under ``ea7b9d5`` (the official visual
            branch's 0.1).
        threshold: a modality is in its prime learning window while the relative increase ``k``
            of its Fisher trace's moving average exceeds this; null: the rule's own (0.05 at
            ``ea7b9d5``, 0.04 at ``41d887f``).
        window: epochs of the trace's moving average (official 10).
        lam_uni: weight of the unimodal cross-entropies in the loss (official 1).
    """

    rule: Rule = "ea7b9d5"
    beta: float = 0.95
    beta_others: float = 0.1
    threshold: float | None = None
    window: int = 10
    lam_uni: float = 1.0

    def __post_init__(self) -> None:
        check(self.beta >= 0, f"method.beta must be >= 0, got {self.beta}")
        check(self.beta_others >= 0, f"method.beta_others must be >= 0, got {self.beta_others}")
        check(self.window >= 1, f"method.window must be >= 1, got {self.window}")
        check(self.lam_uni >= 0, f"method.lam_uni must be >= 0, got {self.lam_uni}")

    @property
    def window_threshold(self) -> float:
        """The threshold in force: the option, or the rule's own."""
        return THRESHOLDS[self.rule] if self.threshold is None else self.threshold

    def beta0(self, position: int) -> float:
        """``beta0`` of the modality at ``position`` in the model's order."""
        if self.rule == "ea7b9d5" and position > 0:
            return self.beta_others
        return self.beta


@METHODS.register("inforeg")
class InfoReg(Method):
    """Proximal regulation of the leading modality's encoder inside its prime learning window."""

    name = "inforeg"
    tasks = ("classification",)
    Params = InfoRegParams
    search_space = ("method.beta", (0.3, 0.95, 3.0))

    @property
    def needs_unimodal_heads(self) -> bool:  # type: ignore[override]
        """Rule ``41d887f`` scores separate unimodal heads; ``ea7b9d5`` the fused head's slices."""
        return self.params.rule == "41d887f"

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.traces: dict[str, list[float]] = {}
        self.k: dict[str, float] = {}
        self._start: dict[str, list[Tensor]] = {}
        self._fisher: dict[str, list[Tensor]] = {}

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        if self.params.rule == "ea7b9d5" and not info.additive_fusion:
            raise ConfigError(
                "method 'inforeg' with rule ea7b9d5 reads the fused head's per-modality slices: "
                "use fusion=late_sum or concat_linear (or method.rule=41d887f with unimodal heads)"
            )
        self.traces = {m: [] for m in info.modalities}
        return None

    @staticmethod
    def fisher_tensors(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
        """The encoder tensors whose squared gradients make the Fisher trace (>= 2-D)."""
        return [p for p in params if p.dim() >= 2]

    # --- epochs ---------------------------------------------------------------------------------
    def on_epoch_start(self, ctx: EpochContext) -> None:
        self.k = {}
        for m, params in ctx.encoder_params.items():
            self._start[m] = [p.detach().clone() for p in params]
            self._fisher[m] = [torch.zeros_like(p) for p in self.fisher_tensors(params)]
            self.k[m] = window_k(self.traces.setdefault(m, []), self.params.window)
            ctx.log(f"window_k_{m}", self.k[m])

    def on_epoch_end(self, ctx: EpochContext) -> None:
        for m, acc in self._fisher.items():
            trace = float(sum(a.mean() for a in acc)) if acc else 0.0
            self.traces.setdefault(m, []).append(trace)
            ctx.log(f"fisher_trace_{m}", trace)

    # --- steps ----------------------------------------------------------------------------------
    def unimodal_logits(self, output: ModelOutput) -> dict[str, Tensor]:
        """Each modality's own logits ``u_m`` under the rule: the fused head's slices plus
        ``b / M`` (``ea7b9d5``) or the unimodal heads (``41d887f``)."""
        if self.params.rule == "ea7b9d5":
            return modality_logits(output, None)
        if not output.unimodal_logits:
            raise ConfigError("method 'inforeg' with rule 41d887f needs unimodal_heads=true")
        return dict(output.unimodal_logits)

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        own = self.unimodal_logits(output)
        modalities = list(own)
        scores = score_sums(own, ctx.targets)
        if ctx.world_size > 1:
            scores = ctx.all_reduce(scores)
        beta: tuple[str, float] | None = None
        lead = leader_and_gap(scores)
        if lead is not None:
            m = modalities[lead[0]]
            if self.k.get(m, 1.0) > self.params.window_threshold:
                beta = (m, proximal_coefficient(lead[1], self.params.beta0(lead[0])))
        ctx.scratch["inforeg_beta"] = beta
        for m in modalities:
            ctx.log(f"beta_{m}", beta[1] if beta and beta[0] == m else 0.0)
        uni = {f"uni_{m}": self.params.lam_uni * ctx.task_loss(u) for m, u in own.items()}
        return {"task": ctx.task_loss(output.logits)} | uni

    def rewrite_gradients(self, ctx: StepContext) -> None:
        regulated = ctx.scratch.get("inforeg_beta")
        with torch.no_grad():
            if regulated is not None:
                m, beta = regulated
                start = self._start.get(m)
                if start is None:
                    raise RuntimeError("InfoReg needs on_epoch_start before its first step")
                for p, p0 in zip(ctx.encoder_params[m], start, strict=True):
                    term = beta * (p - p0)
                    if p.grad is None:
                        p.grad = term
                    else:
                        p.grad.add_(term)
            for m, acc in self._fisher.items():
                tensors = self.fisher_tensors(ctx.encoder_params.get(m, ()))
                for a, p in zip(acc, tensors, strict=True):
                    if p.grad is not None:
                        a.addcmul_(p.grad, p.grad)

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"traces": {m: list(v) for m, v in self.traces.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.traces = {m: [float(x) for x in v] for m, v in state["traces"].items()}
