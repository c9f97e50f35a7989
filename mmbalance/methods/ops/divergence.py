"""Divergences between two predictions, plain and hand-differentiated.

- :func:`jsd_rows`, :func:`jsd`, :func:`divergence_rows`: the Jensen-Shannon divergence of two
  softmax predictions (natural log, in log space so that it stays finite for saturated
  predictions), and the mean squared difference for regression; plain autograd (LFM's alignment
  term, MCR's ``per_mask`` evaluation).
- :func:`set_divergences`: the mean divergence of many perturbed predictions to one reference,
  per set of rows, with per-set gradient weights (MCR's ``per_set`` evaluation, whose game
  weights are realised in the backward pass). Its backward pass is written by hand
  (:func:`set_divergence_forward` keeps what :func:`set_divergence_backward` needs): on CPU,
  PyTorch's row-wise ``log_softmax`` over few classes is several times slower than the same
  reduction over a leading dimension, so the class dimension comes first (``(S, C, R, B)``), and
  the hand-written backward replaces some twenty autograd nodes by a few fused expressions (fewer,
  larger kernels, which is also what a GPU wants). ``tests/test_method_ops.py`` checks it against
  autograd (``gradcheck`` in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from mmbalance.methods.base import Task
from mmbalance.methods.ops.precision import compute_dtype

_LN2 = math.log(2.0)


def jsd_rows(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise Jensen-Shannon divergence (natural log) between ``softmax(u)`` and ``softmax(v)``.

    Computed in log space (``log m = logaddexp(log p, log q) - ln 2``) so that it stays finite and
    differentiable for saturated predictions; the value lies in ``[0, ln 2]``. This is the plain
    autograd formulation (MCR's ``per_mask`` evaluation, LFM's alignment term); MCR's ``per_set``
    evaluation uses :func:`set_divergences`.
    """
    logp = F.log_softmax(u, dim=-1)
    logq = F.log_softmax(v, dim=-1)
    logm = torch.logaddexp(logp, logq) - _LN2
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def jsd(u: Tensor, v: Tensor) -> Tensor:
    """Mean over rows of :func:`jsd_rows` (the reference code's "batchmean")."""
    return jsd_rows(u, v).mean()


def divergence_rows(u: Tensor, v: Tensor, task: Task) -> Tensor:
    """JSD for classification, the mean squared difference of the outputs for regression."""
    if task == "classification":
        return jsd_rows(u, v)
    return (u - v).pow(2).mean(-1)


def set_divergence_forward(
    u: Tensor, v: Tensor, regression: bool, keep_v: bool = True
) -> tuple[Tensor, list[Tensor]]:
    """Per-set mean divergences ``D`` ``(S,)`` of class-major logits, and what the backward needs.

    ``u`` ``(S, C, R, B)`` (set, class, permutation, row), ``v`` ``(S or 1, C, 1, B)``; ``D_S`` is
    the mean over the ``R * B`` rows of the row divergence: the JSD of the softmax over ``C``
    (natural log), or the mean squared difference for regression. No autograd.

    JSD: with ``L = log(p + q)``, ``a = log p - L`` and ``b = log q - L``, ``KL(p||m) = sum_c p a +
    ln 2`` (``sum p = 1``), so ``JSD = (sum p a + sum q b) / 2 + ln 2``, and
    ``dJSD/du = p (a - sum_c p a) / 2`` (the ``ln 2`` cancels; likewise for ``v``). ``L`` is
    ``log(max(p + q, tiny))``: where ``p + q`` underflows both terms carry a factor ``p`` or ``q``
    below ``tiny``, so the clamp changes the value by less than ``1e-36`` and avoids the
    ``0 * inf`` of ``log 0``. The class dimension is not the last one: on CPU, reducing over a
    leading dimension of few classes is several times faster than PyTorch's row-wise
    ``log_softmax`` (on GPU either layout is one kernel per operation).
    """
    if regression:
        diff = u - v
        return diff.square().mean((1, 2, 3)), [diff]
    logp = torch.log_softmax(u, 1)
    p = logp.exp()
    logq = torch.log_softmax(v, 1)
    q = logq.exp()
    log_sum = (p + q).clamp_min_(torch.finfo(p.dtype).tiny).log_()
    a = logp.sub_(log_sum)  # log p - L
    kl_p = (p * a).sum(1, keepdim=True)
    if not keep_v:  # v's gradient is not wanted: sum q b = sum q log q - sum q L, no b
        kl_q = (q * logq).sum(1, keepdim=True) - (q * log_sum).sum(1, keepdim=True)
        per_set = (kl_p + kl_q).mean((1, 2, 3)).mul_(0.5).add_(_LN2)
        return per_set, [p, a, kl_p]
    b = log_sum.neg_().add_(logq)  # log q - L
    kl_q = (q * b).sum(1, keepdim=True)
    per_set = (kl_p + kl_q).mean((1, 2, 3)).mul_(0.5).add_(_LN2)
    return per_set, [p, a, kl_p, q, b, kl_q]


def set_divergence_backward(
    saved: Sequence[Tensor], coef_u: Tensor | None, coef_v: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum_S coef_u[S] D_S`` in ``u`` and of ``sum_S coef_v[S] D_S`` in ``v``
    (``None``: not needed); ``v``'s per set, summed over ``R``: ``(S, C, 1, B)``."""
    gu = gv = None
    if len(saved) == 1:
        (diff,) = saved
        s, c, r, b = diff.shape
        scale = 2.0 / (c * r * b)
        if coef_u is not None:
            gu = diff * (coef_u * scale).view(s, 1, 1, 1)
        if coef_v is not None:
            gv = (diff * (coef_v * -scale).view(s, 1, 1, 1)).sum(2, keepdim=True)
        return gu, gv
    p, a, kl_p, *v_part = saved
    s, c, r, b = p.shape
    scale = 0.5 / (r * b)
    if coef_u is not None:
        gu = (a - kl_p).mul_(p).mul_((coef_u * scale).view(s, 1, 1, 1))
    if coef_v is not None:
        q, b_, kl_q = v_part
        gv = (b_ - kl_q).mul_(q).mul_((coef_v * scale).view(s, 1, 1, 1)).sum(2, keepdim=True)
    return gu, gv


class RoutedSetDivergence(torch.autograd.Function):
    """Per-set divergences with per-set gradient weights (any head; see
    :func:`set_divergences`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        u: Tensor,
        v: Tensor,
        w_u: Tensor,
        w_v: Tensor,
        w_value: Tensor,
        regression: bool,
        v_silent: bool,
    ) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(u, v)
        ctx.in_dtypes = (u.dtype, v.dtype)  # type: ignore[attr-defined]
        ctx.shared_v = v.shape[0] == 1 and u.shape[0] > 1  # type: ignore[attr-defined]
        ctx.v_silent = v_silent  # type: ignore[attr-defined]
        with torch.autocast(u.device.type, enabled=False):
            per_set, saved = set_divergence_forward(
                u.to(dtype), v.to(dtype), regression, keep_v=not v_silent
            )
            value = (w_value.to(dtype) * per_set).sum()
        ctx.save_for_backward(w_u, w_v, *saved)
        ctx.mark_non_differentiable(per_set)
        return value, per_set

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_value: Tensor, _g_per_set: Tensor
    ) -> tuple[Tensor | None, ...]:
        w_u, w_v, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        u_dtype, v_dtype = ctx.in_dtypes  # type: ignore[attr-defined]
        need_u, need_v = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        need_v = need_v and not ctx.v_silent  # type: ignore[attr-defined]
        g = g_value.to(saved[0].dtype)
        gu, gv = set_divergence_backward(
            saved, g * w_u.to(g.dtype) if need_u else None, g * w_v.to(g.dtype) if need_v else None
        )
        if gv is not None and ctx.shared_v:  # type: ignore[attr-defined]
            gv = gv.sum(0, keepdim=True)
        gu = None if gu is None else gu.to(u_dtype)
        gv = None if gv is None else gv.to(v_dtype)
        return gu, gv, None, None, None, None, None


def set_divergences(
    u: Tensor,
    v: Tensor,
    w_u: Tensor,
    w_v: Tensor,
    w_value: Tensor,
    task: Task,
    v_silent: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(sum_S w_value[S] D_S, D)``: per-set divergences with game-routed gradients.

    ``u`` of set ``S`` receives ``w_u[S] * dD_S/du`` and ``v`` receives ``w_v[S] * dD_S/dv``
    (summed over the sets when it is shared), times the upstream gradient of the value. With
    ``w_u = w_v = w_value`` this is the plain derivative of the value; other weights route the
    gradient as the game requires. ``D`` (detached) is returned for logging.

    Args:
        u: perturbed logits, class-major ``(S, C, R, B)``.
        v: reference logits ``(1, C, 1, B)`` (shared by the sets) or ``(S, C, 1, B)``.
        w_u, w_v, w_value: ``(S,)`` gradient weights of ``u`` and ``v`` and the weights of the
            returned value.
        task: ``classification`` (JSD) or ``regression`` (mean squared difference).
        v_silent: ``w_v`` is all zero (known on the host, so no device synchronisation): ``v``
            receives no gradient and its part of the backward pass is skipped.
    """
    value, per_set = RoutedSetDivergence.apply(
        u, v, w_u, w_v, w_value, task == "regression", v_silent
    )
    return value, per_set
