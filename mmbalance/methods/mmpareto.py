"""MMPareto (Wei & Hu, ICML 2024): conflict-free multimodal and unimodal gradients.

Losses: the fused loss ``task`` and one unimodal-head loss ``uni_<m>`` per modality. For the
encoder of modality ``m`` let ``g_m`` be the gradient of the fused loss and ``g_u`` that of its
unimodal loss. Per encoder (all of its trainable tensors flattened together):

1. ``cos(g_m, g_u) > 0``: weights ``(1/2, 1/2)``; otherwise the two-vector min-norm (MGDA) weights
   ``a = (|g_u|^2 - g_m.g_u) / |g_m - g_u|^2``, ``(a, 1 - a)``, *not clipped*. As in the official
   ``MinNormSolver._min_norm_element_from2``: its values 0.999 and 0.001 come only from its two
   boundary branches (``g_m.g_u >= |g_m|^2`` or ``>= |g_u|^2``), which cannot be reached when
   ``g_m.g_u <= 0`` and both gradients are non-zero; there the closed form lies in ``(0, 1)`` and
   is used as it is, also below 0.001 or above 0.999 (which happens whenever one gradient is much
   larger than the other). When a gradient vanishes, the weight here is ``1/2`` where the official
   code takes 0.999 or 0.001; after the per-tensor norm restoration of step 2 both give
   ``gamma`` times the non-zero gradient, so only the logged weight differs;
2. per parameter tensor ``p``: ``h_p = 2 a g_m,p + 2 (1 - a) g_u,p`` and the new gradient
   ``gamma * max(|g_m,p + g_u,p| / |h_p|, 1) * h_p`` (``gamma`` = 1.5 in the official code, where
   it is hard-coded; here it is ``method.gamma``). Without conflict this is ``gamma (g_m + g_u)``.

Heads keep the gradient of the summed losses.

Backward passes (``variant: exact``): the official code runs ``M + 2`` (one per loss, then one for
the sum). Here, whatever the number of modalities, two: ``torch.autograd.grad`` of the fused
loss restricted to the encoder parameters gives every ``g_m``; then one ordinary backward of the
summed loss fills every ``.grad`` (heads included) with ``g_m + g_u``, so ``g_u`` is a
subtraction. Unimodal losses need no pass of their own: encoders share no parameters, so the
unimodal losses of other modalities contribute nothing to encoder ``m``'s gradient. Under DDP the ordinary
backward is all-reduced (averaged) by DDP as usual, so heads and the sums come out averaged; the
fused-loss encoder gradients, which ``torch.autograd.grad`` computes outside DDP, are packed into
one flat buffer and all-reduced once. Every rank then holds the same averaged ``g_m`` and
``g_m + g_u`` and makes the same decision.

``variant: latent`` (one backward pass) decides the weights from the gradients with respect to
each encoder's output ``z_m`` instead of its parameters, as MGDA-UB does: two cheap passes through
the heads only give ``dL_task/dz_m`` and ``dL_u/dz_m``; the cosine, the weights and one rescale
factor per encoder (``|c_m + c_u| / |h|`` on those latent gradients, then ``max(., 1) * gamma``)
come from three all-reduced inner products per modality; one backward of a surrogate loss sends
the combined cotangent into each encoder and the plain summed gradient into the heads. It is not
the exact algorithm (the decision uses a different vector, the rescale is per encoder, not per
tensor); its accuracy is benchmarked against the exact variant.

Why no library: ``torchjd`` (0.18, requires ``torch>=2.3``, so it installs next to
``torch==2.13``) provides Jacobian descent with an MGDA aggregator, but MMPareto is not an
aggregator of a Jacobian: it needs a per-encoder cosine test, two-vector weights and
per-tensor norm restoration, and our DDP rule of one all-reduce per loss. torchjd would compute
the same per-loss gradients, and we would still write the rule around it; the two-vector closed
form and a K-vector solver (:mod:`mmbalance.methods.ops.min_norm`) are a few tested lines, so no
dependency is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.methods.base import (
    METHODS,
    Method,
    StepContext,
    total_loss,
    unimodal_losses,
)
from mmbalance.methods.ops.min_norm import min_norm_2
from mmbalance.models.output import ModelOutput


@dataclass
class MMParetoParams:
    """Options of MMPareto.

    Attributes:
        gamma: magnitude enhancement applied after the norm restoration (official: 1.5).
        lam_uni: weight of each unimodal loss (official: 1).
        variant: ``exact`` (the algorithm, two backward passes) or ``latent`` (weights decided on
            the encoder outputs' gradients, one backward pass).
    """

    gamma: float = 1.5
    lam_uni: float = 1.0
    variant: Literal["exact", "latent"] = "exact"

    def __post_init__(self) -> None:
        check(self.gamma > 0, f"method.gamma must be > 0, got {self.gamma}")
        check(self.lam_uni > 0, f"method.lam_uni must be > 0, got {self.lam_uni}")
        check(
            self.variant in ("exact", "latent"),
            f"method.variant must be 'exact' or 'latent', got {self.variant!r}",
        )


def pareto_weight(dot: float, nm: float, nu: float) -> float:
    """Weight on the fused-loss gradient from ``g_m.g_u``, ``|g_m|^2`` and ``|g_u|^2``.

    ``1/2`` when the cosine is positive (or undefined because a gradient vanishes), otherwise the
    two-vector min-norm weight, unclipped: with ``dot <= 0`` and both norms positive it lies
    strictly inside ``(0, 1)``, so :func:`min_norm_2`'s projection onto ``[0, 1]`` never acts.
    """
    if nm <= 0.0 or nu <= 0.0 or dot > 0.0:
        return 0.5
    return min_norm_2(nm, dot, nu)


@dataclass
class EncoderDecision:
    """What MMPareto decided for one encoder in one step (logged)."""

    cos: float
    alpha: float
    factors: Tensor  # per-tensor max(|g_m + g_u| / |h|, 1), before gamma


def combine_encoder_gradients(
    gm: Sequence[Tensor], gu: Sequence[Tensor], gamma: float
) -> tuple[list[Tensor], EncoderDecision]:
    """MMPareto's gradient for one encoder from its per-tensor ``g_m`` and ``g_u``.

    Pure function (no autograd, no communication, inputs unchanged): the inputs must already be
    the gradients all ranks agree on. (The method itself holds ``g_m`` and ``g_m + g_u``, and
    calls :func:`rewrite_encoder_gradients` on them.)
    """
    if len(gm) != len(gu) or not gm:
        raise ValueError("gm and gu must be non-empty lists of the same length")
    total = torch._foreach_add(list(gm), list(gu))
    ((new, decision),) = rewrite_encoder_gradients([[g.clone() for g in gm]], [total], gamma)
    return new, decision


def rewrite_encoder_gradients(
    gm: Sequence[Sequence[Tensor]], total: Sequence[Sequence[Tensor]], gamma: float
) -> list[tuple[list[Tensor], EncoderDecision]]:
    """MMPareto's rule for several encoders at once, in place.

    ``gm[e]`` and ``total[e]`` are encoder ``e``'s per-tensor fused-loss gradient ``g_m`` and
    summed-loss gradient ``g_m + g_u`` (``g_u = total - g_m``); the per-tensor norm of ``total``
    is the uniform norm ``|g_m,p + g_u,p|`` (the official code takes it of ``param.grad`` after
    the summed backward). Returns, per encoder, its new gradients, written into ``total``'s
    tensors (``gm``'s are overwritten too), and its decision.

    The cost is what the rule needs and is memory traffic on large encoders: per tensor,
    ``g_u`` is formed in one scratch buffer of the largest tensor's size (reused, so no
    gradient-sized allocation) for its exact dot product with ``g_m`` (BLAS) and its norm; the
    encoder-wide sums are accumulated in float64 from the per-tensor results and read to the
    host in one transfer for all encoders; then ``h = 2 a g_m + 2 (1 - a) g_u =
    2 (1 - a) total + (4 a - 2) g_m`` (the same rounding as forming ``g_u`` first), its norms and
    the rescale are ``foreach`` calls over every tensor, in place.
    """
    sizes = [len(g) for g in gm]
    if not sizes or min(sizes) == 0 or [len(g) for g in total] != sizes:
        raise ValueError("gm and total must hold non-empty lists of the same lengths")
    flat_m = [t for g in gm for t in g]
    flat_t = [t for g in total for t in g]
    scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    dots, norms_u = [], []
    for g, t in zip(flat_m, flat_t, strict=True):
        key = (g.dtype, g.device)
        if key not in scratch:
            largest = max(x.numel() for x in flat_m if (x.dtype, x.device) == key)
            scratch[key] = torch.empty(largest, dtype=g.dtype, device=g.device)
        gu = scratch[key][: g.numel()]
        torch.sub(t.reshape(-1), g.reshape(-1), out=gu)
        dots.append(torch.dot(g.reshape(-1), gu))
        norms_u.append(torch.linalg.vector_norm(gu))
    per_tensor = torch.stack(
        [
            torch.stack(dots).double(),
            torch.stack(torch._foreach_norm(flat_m)).double().square(),
            torch.stack(norms_u).double().square(),
        ]
    )  # (3, P): g_m . g_u, |g_m|^2, |g_u|^2
    norms_t = torch.stack(torch._foreach_norm(flat_t))
    stats = torch.stack([chunk.sum(1) for chunk in per_tensor.split(sizes, dim=1)]).tolist()
    weights_m, weights_t, decisions = [], [], []
    for (dot, nm, nu), n in zip(stats, sizes, strict=True):
        cos = dot / max((nm * nu) ** 0.5, 1e-300) if nm > 0 and nu > 0 else 1.0
        alpha = pareto_weight(dot, nm, nu)
        decisions.append((cos, alpha))
        weights_m += [4 * alpha - 2] * n
        weights_t += [2 * (1 - alpha)] * n
    torch._foreach_mul_(flat_m, weights_m)
    torch._foreach_mul_(flat_t, weights_t)
    torch._foreach_add_(flat_t, flat_m)  # h, in total's storage
    norms_h = torch.stack(torch._foreach_norm(flat_t))
    factors = torch.where(norms_h > 0, norms_t / norms_h.clamp_min(1e-30), 1.0).clamp_min(1.0)
    torch._foreach_mul_(flat_t, list((gamma * factors).to(flat_t[0].dtype).unbind()))
    out = []
    for g, f, (cos, alpha) in zip(
        _split(flat_t, sizes), factors.split(sizes), decisions, strict=True
    ):
        out.append((g, EncoderDecision(cos, alpha, f)))
    return out


def _split(items: Sequence[Tensor], sizes: Sequence[int]) -> list[list[Tensor]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(items[start : start + n]))
        start += n
    return out


def _zeros_for_none(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


@METHODS.register("mmpareto")
class MMPareto(Method):
    """Per encoder: Pareto combination of the fused and unimodal gradients, norm-restored."""

    name = "mmpareto"
    Params = MMParetoParams
    needs_unimodal_heads = True
    search_space = ("method.gamma", (1.0, 1.5, 2.0))

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        # the latent variant differentiates with respect to the encoder outputs of this step
        ctx.scratch["latents"] = dict(output.latents)
        return {"task": ctx.task_loss(output.logits)} | unimodal_losses(
            output, ctx, self.params.lam_uni
        )

    def backward(self, losses: Mapping[str, Tensor], ctx: StepContext) -> None:
        if self.params.variant == "latent":
            self._backward_latent(losses, ctx)
        else:
            self._backward_exact(losses, ctx)

    # --- exact: two backward passes ---------------------------------------------------------
    def _backward_exact(self, losses: Mapping[str, Tensor], ctx: StepContext) -> None:
        modalities = [m for m in ctx.encoder_params if ctx.encoder_params[m]]
        params = [p for m in modalities for p in ctx.encoder_params[m]]
        if not params:
            ctx.backward(total_loss(losses))
            return
        fused = torch.autograd.grad(losses["task"], params, retain_graph=True, allow_unused=True)
        g_task = _zeros_for_none(fused, params)
        if ctx.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in g_task])
            flat = ctx.all_reduce(flat) / ctx.world_size
            g_task = [
                chunk.view_as(p)
                for chunk, p in zip(flat.split([p.numel() for p in params]), params, strict=True)
            ]
        ctx.backward(total_loss(losses))  # heads: summed gradient; encoders: g_m + g_u
        encoders = [list(ctx.encoder_params[m]) for m in modalities]
        total = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        sizes = [len(enc) for enc in encoders]
        results = rewrite_encoder_gradients(
            _split(g_task, sizes), _split(total, sizes), self.params.gamma
        )
        for m, enc, (new, decision) in zip(modalities, encoders, results, strict=True):
            for p, g in zip(enc, new, strict=True):
                p.grad = g
            self._log(ctx, m, decision.cos, decision.alpha, decision.factors)

    # --- latent: one backward pass ----------------------------------------------------------
    def _backward_latent(self, losses: Mapping[str, Tensor], ctx: StepContext) -> None:
        latents = ctx.scratch.get("latents")
        if latents is None:
            raise RuntimeError("mmpareto: losses() must run before backward() in the same step")
        modalities = [m for m in latents if latents[m].requires_grad]
        if not modalities:
            ctx.backward(total_loss(losses))
            return
        zs = [latents[m] for m in modalities]
        uni = [losses[f"uni_{m}"] for m in modalities if f"uni_{m}" in losses]
        c_task = _zeros_for_none(
            torch.autograd.grad(losses["task"], zs, retain_graph=True, allow_unused=True), zs
        )
        c_uni = _zeros_for_none(
            torch.autograd.grad(torch.stack(uni).sum(), zs, retain_graph=True, allow_unused=True),
            zs,
        )
        stats = torch.stack(
            [
                torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()])
                for a, b in zip(c_task, c_uni, strict=True)
            ]
        )
        if ctx.world_size > 1:
            stats = ctx.all_reduce(stats)  # sums of per-rank inner products: global ones
        correction = []
        for k, (dot, nm, nu) in enumerate(stats.double().tolist()):
            alpha = pareto_weight(dot, nm, nu)
            a, b = 2 * alpha, 2 * (1 - alpha)
            norm_h2 = a * a * nm + b * b * nu + 2 * a * b * dot
            norm_sum2 = nm + nu + 2 * dot
            factor = max((norm_sum2 / norm_h2) ** 0.5, 1.0) if norm_h2 > 0 else 1.0
            cos = dot / (nm * nu) ** 0.5 if nm > 0 and nu > 0 else 1.0
            scale = self.params.gamma * factor
            wanted = (scale * a) * c_task[k] + (scale * b) * c_uni[k]
            correction.append((zs[k] * (wanted - c_task[k] - c_uni[k]).detach()).sum())
            self._log(ctx, modalities[k], cos, alpha, torch.tensor([factor]))
        # d(surrogate)/d(heads) = d(total)/d(heads); d(surrogate)/dz_m = the combined cotangent
        ctx.backward(total_loss(losses) + torch.stack(correction).sum())

    @staticmethod
    def _log(ctx: StepContext, m: str, cos: float, alpha: float, factors: Tensor) -> None:
        """Per encoder and step: the cosine, ``conflict_<m>`` (1 when the min-norm weights were
        used, so its mean over steps is the conflict rate), the weight on the fused-loss gradient
        and the per-tensor norm-restoration factors (mean and max, before ``gamma``)."""
        ctx.log(f"cos_{m}", cos)
        ctx.log(f"conflict_{m}", 0.0 if cos > 0 else 1.0)
        ctx.log(f"alpha_task_{m}", alpha)
        ctx.log(f"rescale_mean_{m}", factors.mean())
        ctx.log(f"rescale_max_{m}", factors.max())
