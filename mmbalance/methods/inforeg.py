"""InfoReg: adaptive unimodal regulation in the prime learning window (Huang, Wei, Yang, Hu,
CVPR 2025; official code GeWu-Lab/InfoReg_CVPR2025, ``main.py``).

The loss is the fused cross-entropy plus one cross-entropy per unimodal head,
``CE(fused) + lam_uni * sum_m CE(u_m)``. Two signals decide whether a modality is held back:

- **Prime learning window** (per epoch, per modality). The Fisher-information trace of encoder
  ``m`` over an epoch is ``tr_m = sum_tensors mean(sum_steps g^2)``: the squared gradient of every
  weight tensor (every trainable encoder tensor with at least 2 dimensions: the conv kernels and
  linear weights the official code selects) summed over the epoch's steps, averaged over the
  tensor's elements, summed over tensors. With ``bar_t = (sum of the last w traces) / w``
  (``w = window``, 10; fewer than ``w`` traces count the missing ones as 0, as the official
  ``sum(list[-10:]) / 10`` does), the relative increase is ``k = (bar_t - bar_{t-1}) / bar_t``
  (``k = 1`` before the first trace exists, ``k = 0`` if the average is 0). Modality ``m`` is in its prime learning window in an
  epoch while ``k_m > threshold`` (0.04).
- **Leading modality** (per step). ``s_m = sum_batch softmax(u_m)[y]`` (batch *sums* of the
  true-class probability, all-reduced under DDP); the leader is the modality with the largest
  score, ``gap = s_lead - s_runner_up``. If the leader is in its window, its encoder gets the
  proximal term ``grad += beta (theta - theta_epoch_start)`` with
  ``beta = beta0 * exp(tanh(gap))`` (``beta0`` 0.95): it is pulled back towards where it started
  the epoch, which slows it while the others catch up.

Where this departs from the official code, and why:

- **Every modality can be regulated.** The official visual branch repeats the audio condition
  (``elif score_v < score_a``, after ``if score_a > score_v``), so it never runs and only audio is
  ever regulated; its coefficient, ``0.1 * exp(tanh(.))``, is therefore untested in practice.
  Here whichever modality leads is regulated, with the same ``beta0`` for all (the paper's single
  formula), for any number of modalities.
- **Per-modality windows.** The official detector uses the audio trace for every decision. Here
  the leader's own trace decides, since the window is a property of how that encoder is learning.
- With more than two modalities the gap is to the runner-up (the official two-modality rule is
  the special case); only the leader is regulated in a step.
- The Fisher trace is accumulated after the proximal term is added (as in the official code, which
  squares the final gradients), from the same gradients the optimizer uses; the official code's
  three extra backward passes that only log per-loss gradients are not made.
- The official code decides the window at the epoch's start from the previous epochs' traces, as
  here; ``theta_epoch_start`` is the encoder at the start of the current epoch (the official
  ``deepcopy`` of the model at the start of ``train_epoch``).

Official settings (CREMA-D, ``main.py``): SGD lr 2e-3 (momentum 0.9, weight decay 1e-4 in
``main``), StepLR(40, 0.1), batch 64, 80 epochs, ResNet-18 encoders, concat head plus two
unimodal heads. Logged per step: ``beta_<m>`` (0 for modalities not regulated); per epoch:
``window_k_<m>`` and ``fisher_trace_<m>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.methods.base import (
    METHODS,
    EpochContext,
    Method,
    ModelInfo,
    StepContext,
    unimodal_losses,
)
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


@dataclass
class InfoRegParams:
    """InfoReg options.

    Attributes:
        beta: ``beta0`` of the proximal coefficient ``beta0 * exp(tanh(gap))`` (official 0.95).
        threshold: a modality is in its prime learning window while the relative increase ``k``
            of its Fisher trace's moving average exceeds this (official 0.04).
        window: epochs of the trace's moving average (official 10).
        lam_uni: weight of the unimodal heads' cross-entropies in the loss (official 1).
    """

    beta: float = 0.95
    threshold: float = 0.04
    window: int = 10
    lam_uni: float = 1.0

    def __post_init__(self) -> None:
        check(self.beta >= 0, f"method.beta must be >= 0, got {self.beta}")
        check(self.window >= 1, f"method.window must be >= 1, got {self.window}")
        check(self.lam_uni >= 0, f"method.lam_uni must be >= 0, got {self.lam_uni}")


@METHODS.register("inforeg")
class InfoReg(Method):
    """Proximal regulation of the leading modality's encoder inside its prime learning window."""

    name = "inforeg"
    tasks = ("classification",)
    Params = InfoRegParams
    needs_unimodal_heads = True
    search_space = ("method.beta", (0.3, 0.95, 3.0))

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.traces: dict[str, list[float]] = {}
        self.k: dict[str, float] = {}
        self._start: dict[str, list[Tensor]] = {}
        self._fisher: dict[str, list[Tensor]] = {}

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
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
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        modalities = list(output.unimodal_logits)
        with torch.no_grad():
            idx = ctx.targets.long().unsqueeze(1)
            scores = torch.stack(
                [
                    output.unimodal_logits[m].float().softmax(-1).gather(1, idx).sum()
                    for m in modalities
                ]
            )
            if ctx.world_size > 1:
                scores = ctx.all_reduce(scores)
        regulated: tuple[str, float] | None = None
        lead = leader_and_gap(scores)
        if lead is not None:
            m = modalities[lead[0]]
            if self.k.get(m, 1.0) > self.params.threshold:
                regulated = (m, proximal_coefficient(lead[1], self.params.beta))
        ctx.scratch["regulated"] = regulated  # the proximal term of rewrite_gradients
        for m in modalities:
            ctx.log(f"beta_{m}", regulated[1] if regulated and regulated[0] == m else 0.0)
        return {"task": ctx.task_loss(output.logits)} | unimodal_losses(
            output, ctx, self.params.lam_uni
        )

    def rewrite_gradients(self, ctx: StepContext) -> None:
        regulated = ctx.scratch.get("regulated")
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
