"""AGM: Adaptive Gradient Modulation (Li et al., ICCV 2023).

Follows the official code (``lihong2303/AGM_ICCV2023``: ``model/CREMAD_net.py::GradMod``,
``run/CREMAD_main.py``) where it and the paper or later ports disagree.

Mono-modal responses
--------------------
Each modality's response is its Shapley value in the game "fused output of the coalition ``S``",
``v(S) = f(x_S, x_{not S} masked)`` with ``v(N) = T`` the normal training forward:

``o_m = sum_{S without m} |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S))``, with ``v({}) := 0``.

For two modalities this is the official ``o_a = (T - P_a + P_v) / 2`` (``P_v = f(x_a, 0)``,
``P_a = f(0, x_v)``); the official code computes ``f(0, 0)`` but never uses it, which is exactly
``v({}) := 0``, so ``sum_m o_m = T``. For ``M > 2`` the same formula is the official one's Shapley
generalisation (the official code has none; its MOSEI task runs audio + text only).

How the coalition's absent modalities are masked (``mask``) and where (``space``):

- ``space="input"`` (default, the official code): the inputs of absent modalities are masked and
  re-encoded; like the official code these passes run in eval mode with autograd on. Because
  eval-mode encoders treat every sample on its own, ``f(x_a, 0)`` needs the eval-mode latent of
  ``x_a`` and the latent of an all-zero input, which is the same for every sample: so each encoder
  runs once in eval mode on the batch and once on a single zero sample (expanded), and only the
  fusion head runs once per coalition. This gives the official values and gradients with
  ``M`` eval encoder passes (plus ``M`` one-sample passes) instead of the official ``2^M - 1``
  full passes (three for two modalities, each running both encoders).
- ``space="latent"``: the training latents are masked and only the fusion head is re-run per
  coalition (``2^M - 2`` head passes, no encoder re-run). Cheaper, but **not what the official
  code does**: an encoder's output on a zero input is not a zero latent, and the latents come from
  the train-mode pass.
- ``mask="zero"`` (official) zeroes absent modalities; ``mask="permute"`` replaces them by another
  sample's (a random permutation of the batch, seeded by ``seed`` and the step), which keeps the
  head's inputs on their training distribution. In input space this equals re-encoding permuted
  inputs in eval mode.

Cost per step (forward; backward goes through the same graphs): official code ``1 + (2^M - 1)``
full forwards (4 for ``M = 2``, one unused). ``input``: 1 full forward + ``M`` eval encoder
forwards on the batch + ``M`` one-sample encoder forwards + ``2^M - 2`` head forwards (about 2x
joint). ``latent``: 1 full forward + ``2^M - 2`` head forwards (about 1x joint). Outside the
modulation window the coalitions run without a graph (only their scores are needed).

Coefficients (per step, official code)
--------------------------------------
- ``s_m = mean_b -log max(softmax(o_m)_b[y_b], 1e-8)``;
- ``r_m = exp(M/(M-1) * (mean_k s_k - s_m))`` (two modalities: ``r_a = exp(s_v - s_a)``, > 1 when
  audio has the lower loss), and the target ``eta_m`` the same of the running scores ``s_hat``;
  ``M/(M-1)`` is the MLB port's ``AGM_3mod`` generalisation;
- ``kappa_m = exp(alpha * min(eta_m - r_m, cap))`` (``cap`` 10 in the official CREMA-D code, none in
  its AVE code; no lower clip, so ``kappa -> 0`` is possible): a modality whose relative advantage
  exceeds its historical one is slowed;
- ``s_hat`` is the cumulative equal-weight mean of ``s`` over all steps since the start of
  training (``s_hat <- s_hat (t-1)/t + s/t``, starting at 0), updated after ``kappa`` is taken.

Sign. The official code takes ``r_a = exp(s_v - s_a)``; BalanceBenchmark and a third-party port
flip it (``r_m = exp(M/(M-1)(s_m - mean s))``, ``kappa > 1`` when a modality is *better* than its
history), saying the code differs from the paper's formula. We follow the official code
(``sign="official"``); ``sign="flipped"`` gives the other one.

Gradient routing (official)
---------------------------
The training output is ``sum_m h_m(o_m)`` with ``h_m`` an identity whose backward multiplies by
``kappa_m`` (the official ``Modality_out`` modules with full backward hooks); the loss is
``CE(sum_m h_m(o_m), y)`` (= ``CE(T)`` in value). So ``T`` receives ``(kappa_a + kappa_v)/2 * g``
and the masked passes ``P_v``, ``P_a`` receive ``+-(kappa_a - kappa_v)/2 * g``: the eval-mode
passes carry gradient into the surviving encoder and the fusion head whenever the coefficients
differ. This changes the gradient's direction, not only its scale, so it survives Adam (hence
``scales_gradients`` is False: no notice under Adam). Here ``h_m`` is
:func:`~mmbalance.methods.ops.gradients.scale_grad`.

After backward, if any entry of the fusion head's weight gradients lies outside
``[-clip_threshold, clip_threshold]`` (official: 1, checked on ``fc_out.weight``; here on every
weight matrix of the fusion head), the gradients of the encoders and the fusion head are clipped
to total norm ``clip_norm`` (1), as ``clip_grad_norm_`` does, without a host synchronisation.

Modulation is on in epochs ``start <= epoch <= end`` (official CREMA-D: 0..1500, i.e. always);
outside it ``kappa = 1`` (the official code keeps the hooks' last coefficient there) while the
running scores keep being updated, as in the official code.

Official settings: CREMA-D ``alpha 1.5``, 1500 epochs, window 0-1500 (lihongcs/AGM#3, #5, #10);
AV-MNIST 2.5, UR-Funny 4.0; SGD momentum 0.9, weight decay 1e-4, StepLR(70, 0.1). The MCR
authors' reruns use ``alpha 3`` (CREMA-D, AVE). Evaluation uses ``T``, the plain fused output.

Logged per step: ``score_<m>``, ``ratio_<m>``, ``target_<m>``, ``coeff_<m>``.
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
from mmbalance.methods.base import METHODS, Method, StepContext
from mmbalance.methods.ops.gradients import scale_grad
from mmbalance.methods.ops.modes import eval_mode
from mmbalance.models.output import ModelOutput

_FLOOR = 1e-8


# --- the Shapley responses ----------------------------------------------------------------------
def shapley_weights(num_modalities: int) -> list[float]:
    """``w(s) = s! (M - s - 1)! / M!`` for coalitions of size ``s = 0 .. M-1``."""
    m = num_modalities
    return [math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) for s in range(m)]


def shapley_responses(values: Mapping[int, Tensor], num_modalities: int) -> list[Tensor]:
    """Each player's Shapley value of the game ``values`` (coalition bitmask -> output), with
    ``v(empty) = 0``; ``values`` holds every non-empty coalition (bit ``i`` = modality ``i``)."""
    weights = shapley_weights(num_modalities)
    out = []
    for i in range(num_modalities):
        bit = 1 << i
        total: Tensor | None = None
        for s in range(1 << num_modalities):
            if s & bit:
                continue
            marginal = values[s | bit] if s == 0 else values[s | bit] - values[s]
            term = weights[s.bit_count()] * marginal
            total = term if total is None else total + term
        assert total is not None
        out.append(total)
    return out


def response_scores(responses: Sequence[Tensor], targets: Tensor) -> Tensor:
    """``(M,)`` batch means of ``-log max(softmax(o_m)[y], 1e-8)``, no graph."""
    with torch.no_grad():
        idx = targets.long().unsqueeze(1)
        return torch.stack(
            [
                -o.float().softmax(-1).gather(1, idx).clamp_min(_FLOOR).log().mean()
                for o in responses
            ]
        )


def agm_ratios(scores: Tensor, sign: str = "official") -> Tensor:
    """``exp(M/(M-1) (mean s - s_m))`` (official; ``exp(s_v - s_a)`` for audio of two), or its
    inverse with ``sign="flipped"``."""
    m = scores.shape[0]
    gap = m / (m - 1) * (scores.mean() - scores)
    return torch.exp(gap if sign == "official" else -gap)


def agm_coefficients(
    ratios: Tensor, targets: Tensor, alpha: float, cap: float | None = 10.0
) -> Tensor:
    """``kappa_m = exp(alpha * min(eta_m - r_m, cap))`` (no cap when ``cap`` is None)."""
    diff = targets - ratios
    if cap is not None:
        diff = diff.clamp(max=cap)
    return torch.exp(alpha * diff)


def route(responses: Sequence[Tensor], coefficients: Tensor) -> Tensor:
    """``sum_m h_m(o_m)``: the value of ``sum_m o_m``, with ``o_m``'s gradient times ``kappa_m``."""
    out = scale_grad(responses[0], coefficients[0])
    for i in range(1, len(responses)):
        out = out + scale_grad(responses[i], coefficients[i])
    return out


# --- the method ----------------------------------------------------------------------------------
@dataclass
class AGMParams:
    """AGM options (see the module docstring).

    Attributes:
        alpha: modulation strength of the coefficient exp(alpha * min(eta - r, cap)).
        mask: how a coalition hides the other modalities: zero-padding (official) or a
            within-batch permutation.
        space: where the mask acts: on the inputs, re-encoded (official), or on the latents,
            re-running only the fusion head (cheaper; not what the official code does).
        cap: upper clip of eta - r inside the exponential (null: none).
        clip_threshold: a fusion-head gradient entry beyond +-this triggers norm clipping
            (null: never).
        clip_norm: the gradient norm that clipping enforces.
        start: first epoch of the modulation window.
        end: last epoch of the modulation window, inclusive (null: to the last epoch).
        sign: the ratio as in the official code, or flipped as in BalanceBenchmark's port.
        seed: seeds the permutations of the permute mask.
    """

    alpha: float = 1.5
    mask: Literal["zero", "permute"] = "zero"
    space: Literal["input", "latent"] = "input"
    cap: float | None = 10.0
    clip_threshold: float | None = 1.0
    clip_norm: float = 1.0
    start: int = 0
    end: int | None = None
    sign: Literal["official", "flipped"] = "official"
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}")
        check(self.cap is None or self.cap > 0, f"method.cap must be > 0 or null, got {self.cap}")
        check(
            self.clip_threshold is None or self.clip_threshold > 0,
            f"method.clip_threshold must be > 0 or null, got {self.clip_threshold}",
        )
        check(self.clip_norm > 0, f"method.clip_norm must be > 0, got {self.clip_norm}")
        check(self.start >= 0, f"method.start must be >= 0, got {self.start}")
        check(
            self.end is None or self.end >= self.start,
            f"method.end must be >= method.start ({self.start}) or null, got {self.end}",
        )

    def active(self, epoch: int) -> bool:
        return self.start <= epoch and (self.end is None or epoch <= self.end)


@METHODS.register("agm")
class AGM(Method):
    """Adaptive Gradient Modulation (ICCV 2023): Shapley mono-modal responses from masked passes,
    coefficients ``exp(alpha (eta - r))`` against the running history, routed through the
    responses."""

    name = "agm"
    tasks = ("classification",)
    Params = AGMParams

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        cls.refuse_late_start(params.start, epochs)

    # not a whole-gradient scale: the masked passes change the gradient's direction, which
    # Adam's normalisation does not undo (so no notice under Adam)
    scales_gradients = False
    search_space = ("method.alpha", (0.5, 1.5, 3.0))

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._history: Tensor | None = None  # running mean of the scores, float64 (M,)
        self._count = 0  # steps seen since the start of training

    # --- masked passes ---------------------------------------------------------------------------
    def _permutation(self, n: int, ctx: StepContext, device: torch.device) -> Tensor:
        gen = torch.Generator().manual_seed(self.params.seed * 1_000_003 + ctx.step)
        return torch.randperm(n, generator=gen).to(device)

    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        latents = model.encode(inputs)
        if self.params.space == "input":
            grad = torch.enable_grad() if self.params.active(ctx.epoch) else torch.no_grad()
            with eval_mode(model), grad:
                present = model.encode(inputs)
                if self.params.mask == "zero":
                    zeros = {m: x.new_zeros((1, *x.shape[1:])) for m, x in inputs.items()}
                    absent = {m: z.expand_as(present[m]) for m, z in model.encode(zeros).items()}
                else:
                    n = next(iter(present.values())).shape[0]
                    perm = self._permutation(n, ctx, next(iter(present.values())).device)
                    absent = {m: z[perm] for m, z in present.items()}
            ctx.scratch["masked"] = (present, absent)  # the coalitions' inputs (losses)
        return latents

    def _masked_latents(self, output: ModelOutput, ctx: StepContext) -> tuple[dict, dict]:
        masked = ctx.scratch.get("masked")
        if masked is not None:
            return masked
        present = output.latents
        if self.params.mask == "zero":
            return present, {m: torch.zeros_like(z) for m, z in present.items()}
        n = next(iter(present.values())).shape[0]
        perm = self._permutation(n, ctx, next(iter(present.values())).device)
        return present, {m: z[perm] for m, z in present.items()}

    def coalition_values(self, output: ModelOutput, ctx: StepContext) -> dict[int, Tensor]:
        """``v(S)`` for every non-empty coalition (bitmask over ``output.latents``' order)."""
        if ctx.fusion is None:
            raise ConfigError("method 'agm' needs the fusion head (StepContext.fusion)")
        modalities = list(output.latents)
        full = (1 << len(modalities)) - 1
        present, absent = self._masked_latents(output, ctx)
        values = {full: output.logits}
        grad = torch.enable_grad() if self.params.active(ctx.epoch) else torch.no_grad()
        with eval_mode(ctx.fusion), grad:
            for s in range(1, full):
                latents = {
                    m: (present[m] if s >> i & 1 else absent[m]) for i, m in enumerate(modalities)
                }
                values[s] = ctx.fusion(latents, ()).logits
        return values

    # --- the step --------------------------------------------------------------------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        modalities = list(output.latents)
        values = self.coalition_values(output, ctx)
        responses = shapley_responses(values, len(modalities))
        scores = response_scores(responses, ctx.targets)
        if ctx.world_size > 1:
            scores = ctx.all_reduce(scores) / ctx.world_size
        scores = scores.double()
        if self._history is None:
            self._history = torch.zeros_like(scores)
        history = self._history.to(scores.device)
        ratios = agm_ratios(scores, self.params.sign)
        targets = agm_ratios(history, self.params.sign)
        coeff = agm_coefficients(ratios, targets, self.params.alpha, self.params.cap)
        # the running mean over every step since the start, updated after the coefficient
        self._count += 1
        t = self._count
        self._history = history * (t - 1) / t + scores / t
        for i, m in enumerate(modalities):
            ctx.log(f"score_{m}", scores[i])
            ctx.log(f"ratio_{m}", ratios[i])
            ctx.log(f"target_{m}", targets[i])
            ctx.log(f"coeff_{m}", coeff[i])
        if not self.params.active(ctx.epoch):
            return {"task": ctx.task_loss(output.logits)}
        return {"task": ctx.task_loss(route(responses, coeff.float()))}

    def rewrite_gradients(self, ctx: StepContext) -> None:
        threshold = self.params.clip_threshold
        if threshold is None or not isinstance(ctx.fusion, nn.Module):
            return
        head = [p.grad for p in ctx.fusion.parameters() if p.grad is not None and p.dim() >= 2]
        if not head:
            return
        params = [p for ps in ctx.encoder_params.values() for p in ps]
        params += list(ctx.fusion.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        largest = torch.stack([g.abs().max() for g in head]).max()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = (self.params.clip_norm / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(largest > threshold, coef, torch.ones_like(coef))
        torch._foreach_mul_(grads, coef)

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        history = None if self._history is None else self._history.detach().cpu().clone()
        return {"history": history, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history = state["history"]
        self._count = int(state["count"])
