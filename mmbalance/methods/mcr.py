"""MCR: the Multimodal Competition Regularizer (arXiv 2411.07335).

The loss is ``L = task + lam_uni * sum_m CE(unimodal_m) + R_MIPD + lam_con * L_Con + lam_ceb *
L_CEB``:

- **R_MIPD** (unique information). For a non-empty proper subset ``S`` of the modalities,
  ``L_S = -D_S`` with ``D_S = D(y_hat_S, y_ref)``: the divergence between the prediction with the
  latents of ``S`` perturbed and the unperturbed reference prediction ``y_ref`` (the fused logits
  of the step). ``D`` is the Jensen-Shannon divergence of the softmax predictions (MSE for
  regression), averaged over the rows; the perturbation is by default a within-batch
  permutation, drawn ``K`` times per step. The game strategy with coefficient ``k`` (greedy -1,
  independent 0, collaborative +1) is the rule that encoder ``j`` descends
  ``lam * (sum_{S contains j} L_S + k * sum_{S without j} L_S)``. Each set's *input weight*
  ``w(S, m) = -lam`` if ``m`` is in ``S`` and ``-k * lam`` otherwise is the factor with which
  modality ``m``'s input to the perturbed prediction of ``S`` receives ``dD_S``.

  What the other tensors receive is a convention, the reference code's unless
  :attr:`MCRParams.reference` says otherwise. The reference code realises the game with
  stop-gradient masks: the term ``(S, j)`` evaluates the head with every modality but ``j``
  detached and carries weight ``w(S, j)``, and the collaborative game is one unmasked term
  ``-lam * D_S`` per set. So what is not masked receives the *set weight*
  ``W_S = sum_j w(S, j)`` (greedy, independent; ``-lam * (|S| + k (M - |S|))``) or ``-lam``
  (collaborative) times its derivative of ``D_S``: the head's shared parameters (the shared bias
  of an additive head, every parameter of any other head) and, with ``reference="summed"``
  (the default; the reference code's CREMA-D, AVE and 3-modality models), the reference
  prediction ``y_ref``,
  through which the encoders then receive ``W_S`` times their reference-path derivative, not
  ``w(S, j)``. The value of the term is ``sum_S W_S D_S``: for greedy play with two modalities
  ``W_S = 0``, so the logged ``train_mipd`` is exactly 0 although the gradient is not (the
  divergences themselves are logged per step as ``mcr_div_<m>``; see :meth:`MCR.mipd`), and
  neither ``y_ref`` nor the shared bias receives any gradient. ``reference="masked"`` routes the
  reference path through the same masks, so that encoder ``j`` receives exactly
  ``lam * (sum_{S contains j} grad_j L_S + k * sum_{S without j} grad_j L_S)`` with ``grad_j``
  over both the perturbed and the reference path: the game as defined.
  ``reference="detached"`` stops the gradient into ``y_ref`` (the reference code's
  Something-Something model).

  Two evaluations give the same gradients (to rounding): ``per_mask`` (the reference code's
  one head evaluation and one divergence per term ``(S, j)``) and ``per_set``, the default. For a
  fixed ``S`` every masked term has the same forward value, so ``per_set`` evaluates the head and
  the divergence once per set and realises the masks in the backward pass: each modality's input
  gradient is multiplied by ``w(S, m)``, the shared parameters' and the reference's by ``W_S``.
  That divides the divergence and head work by ``M`` (greedy, independent).
- **L_Con** (shared information): supervised NT-Xent over the L2-normalised latents of all
  modalities; positives are same-label pairs within and across modalities.
- **L_CEB** (task-irrelevant shared information): a small head reconstructs the concatenated
  latents from the label (the paper) or from the detached fused logits (the reference code).

Permuting in latent space is what makes MCR cheap: for additive heads (``late_sum``,
``concat_linear``) the per-modality logit contributions are permuted and recombined, so the extra
cost is a gather and a sum over ``K * B`` rows of ``C`` logits per set; other heads are
re-evaluated on ``K * B`` rows per set, in one call for all sets (two when greedy play with an
even number of modalities has sets with ``W_S = 0``, see :func:`_head_set_logits`). Neither
re-runs an encoder. On CPU the divergence is
computed class-major (``(C, rows)`` memory order) with a hand-written backward pass: PyTorch's
row-wise ``log_softmax`` over few classes is several times slower than the same reduction over
the leading dimension, and the hand-written backward replaces some twenty autograd nodes by a
few fused expressions (fewer, larger kernels, which is also what a GPU wants).

Distributed training: every process permutes within its own share of the global batch, and the
contrastive loss pairs rows within that share too; the gradients are then averaged as usual. So
``N`` processes at global batch ``B`` train like one process at batch ``B`` whose permutation
donors and contrastive pairs are restricted to blocks of ``B / N`` rows, not like one process at
batch ``B`` (``tests/test_mcr.py::test_ddp_equals_per_shard_mcr``): each row's donors and
contrastive negatives come from ``B / N - 1`` other rows instead of ``B - 1``, so metrics differ
from a single-process run at the same global batch.

Unimodal pre-training initialisation (``--pre`` in the paper) is the trainer's
``train.unimodal_pretrain_epochs``: with it > 0, each encoder and its unimodal head start from a
unimodal run of that many epochs.

Three known faults of the reference release are avoided here by construction: the regularizer is
part of the returned loss, the strategy option selects the weights, and every modality (not only
the last) is detached in the masked evaluations for any number of modalities.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    Method,
    ModelInfo,
    StepContext,
    Task,
    unimodal_losses,
)
from mmbalance.models.output import ModelOutput

Strategy = Literal["greedy", "independent", "collaborative"]
STRATEGY_K: dict[str, float] = {"greedy": -1.0, "independent": 0.0, "collaborative": 1.0}
_LN2 = math.log(2.0)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32: half-precision logits are upcast for the divergence arithmetic."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --- divergences ---------------------------------------------------------------------------------
def jsd_rows(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise Jensen-Shannon divergence (natural log) between ``softmax(u)`` and ``softmax(v)``.

    Computed in log space (``log m = logaddexp(log p, log q) - ln 2``) so that it stays finite and
    differentiable for saturated predictions; the value lies in ``[0, ln 2]``. This is the plain
    autograd formulation, used by the ``per_mask`` evaluation; ``per_set`` uses
    :func:`set_divergences`.
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


def _set_divergence_forward(
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


def _set_divergence_backward(
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


class _RoutedSetDivergence(torch.autograd.Function):
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
        dtype = _compute_dtype(u, v)
        ctx.in_dtypes = (u.dtype, v.dtype)  # type: ignore[attr-defined]
        ctx.shared_v = v.shape[0] == 1 and u.shape[0] > 1  # type: ignore[attr-defined]
        ctx.v_silent = v_silent  # type: ignore[attr-defined]
        with torch.autocast(u.device.type, enabled=False):
            per_set, saved = _set_divergence_forward(
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
        gu, gv = _set_divergence_backward(
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
    value, per_set = _RoutedSetDivergence.apply(
        u, v, w_u, w_v, w_value, task == "regression", v_silent
    )
    return value, per_set


# --- contrastive loss -----------------------------------------------------------------------------
#: The hand-differentiated NT-Xent needs ``exp(-2 / temperature)`` to stay a normal float (no
#: underflow, whose slow path costs about 100x on CPU); below this temperature the plain autograd
#: formulation in log space is used.
FAST_NT_XENT_MIN_TEMPERATURE = 0.05


class _SupervisedNTXent(torch.autograd.Function):
    """Supervised NT-Xent of raw embeddings ``z`` ``(N, d)`` (normalised here), hand-differentiated.

    ``same`` is the ``(B, B)`` float label-equality matrix of one modality's rows; the ``N = M B``
    rows are ``M`` blocks of ``B``, row ``(m, b)`` with label ``b``'s, so the pair mask is
    ``same`` tiled ``M x M`` times, applied by broadcasting (never materialised).

    With ``e`` the L2-normalised rows and ``x = (e e^T - 1) / tau`` (the similarity over ``tau``
    shifted by its maximum ``1 / tau``), ``E = exp(x)``, ``n_a = sum_{n negative of a} E_an`` and
    ``D = n_a + E``, each positive pair costs ``log D_ap - x_ap`` (``= logaddexp(s_ap, L_a) -
    s_ap`` with ``L_a`` the log-sum-exp of ``a``'s negatives) and the loss is their mean. With
    ``|x| <= 2 / tau <= 40`` no exponential under- or overflows. Derivative in ``x``:
    ``E / D - 1`` at positive pairs and ``E_an c_a`` at negatives, ``c_a = sum_p 1 / D_ap``
    (both over the number of positive pairs); then ``de = (G + G^T) e / tau`` and the
    normalisation's ``dz = (de - e (e . de)) / |z|``. One autograd node; the ``N x N`` work is
    done in place on float masks (boolean masking, ``-inf`` fills and large temporaries are slow
    on CPU).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, z: Tensor, same: Tensor, temperature: float
    ) -> Tensor:
        dtype = _compute_dtype(z)
        ctx.in_dtype = z.dtype  # type: ignore[attr-defined]
        ctx.temperature = temperature  # type: ignore[attr-defined]
        n = z.shape[0]
        b = same.shape[0]
        m = n // b
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(dtype)
            same = same.to(dtype)
            other_rows = (1.0 - same).expand(m, b, b).reshape(n, b)  # row (k, i): 1 - same[i]
            same_rows = 1.0 - other_rows
            norm = z.norm(dim=1, keepdim=True)
            radial = (norm > 1e-12).to(dtype)
            norm = norm.clamp_min_(1e-12)
            e = z / norm
            shift = e.new_full((1,), -1.0 / temperature)
            x = torch.addmm(shift, e, e.T, alpha=1.0 / temperature)  # (s - 1) / tau
            big_e = x.exp()
            # each row's sum over its negatives through the block structure: sum over the M
            # column blocks first, then the (N, B) product with the label mask (a sum of
            # positive terms: no cancellation, exactly 0 for a row without negatives)
            negatives = (big_e.view(n, m, b).sum(1) * other_rows).sum(1, keepdim=True)
            denom = big_e + negatives
            pair = denom.log().sub_(x)
            pair_sum = (pair.view(n, m, b).sum(1) * same_rows).sum() - pair.diagonal().sum()
            n_pos = (same.sum() * (m * m) - n).clamp_min_(1.0)
            loss = pair_sum / n_pos
        ctx.save_for_backward(e, norm, radial, big_e, denom, same, n_pos)
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g: Tensor
    ) -> tuple[Tensor | None, None, None]:
        e, norm, radial, big_e, denom, same, n_pos = ctx.saved_tensors  # type: ignore[attr-defined]
        n = e.shape[0]
        b = same.shape[0]
        m = n // b
        tiled = same.view(1, b, 1, b)
        # A = positive / D; c_a = sum_p A_ap; dL/dx = E (A + c (1 - T)) - positive
        grad = torch.div(tiled, denom.view(m, b, m, b)).view(n, n)
        grad.fill_diagonal_(0.0)
        c = grad.sum(1, keepdim=True)
        grad.view(m, b, m, b).add_(c.view(m, b, 1, 1) * (1.0 - tiled))  # + c at negatives
        grad.mul_(big_e)
        grad.view(m, b, m, b).sub_(tiled)
        grad.diagonal().add_(1.0)
        scale = g.to(e.dtype) / (n_pos * ctx.temperature)  # type: ignore[attr-defined]
        grad_e = torch.add(grad, grad.T) @ e
        grad_e.mul_(scale)
        grad_z = grad_e.sub_(e * ((e * grad_e).sum(1, keepdim=True) * radial)).div_(norm)
        return grad_z.to(ctx.in_dtype), None, None  # type: ignore[attr-defined]


def nt_xent_autograd(z: Tensor, same: Tensor, temperature: float) -> Tensor:
    """The same loss in log space through autograd (any temperature; reference formulation)."""
    emb = F.normalize(z, dim=-1)
    sim = emb @ emb.T / temperature
    eye = torch.eye(len(same), dtype=torch.bool, device=emb.device)
    positive = (same & ~eye).to(sim.dtype)
    neg_lse = torch.logsumexp(sim.masked_fill(same, float("-inf")), dim=1, keepdim=True)
    pair = torch.logaddexp(sim, neg_lse) - sim
    return (pair * positive).sum() / positive.sum().clamp_min(1.0)


def nt_xent(
    latents: Mapping[str, Tensor],
    labels: Tensor,
    temperature: float,
    num_classes: int | None = None,
) -> Tensor:
    """Supervised NT-Xent over the L2-normalised latents of all modalities.

    The ``M * B`` embeddings are pooled; the label of row ``(m, b)`` is ``labels[b]``. Every other
    row with the same label is a positive, every row with another label a negative, and each
    positive pair ``(a, p)`` costs ``-log(e^{s_ap} / (e^{s_ap} + sum_{n in neg(a)} e^{s_an}))`` with
    ``s`` the cosine similarity over ``temperature``; the loss is the mean over positive pairs
    (0 if there is none; a row without negatives costs 0). Passing sample indices as ``labels``
    gives the plain cross-modal InfoNCE. ``num_classes`` (labels in ``range(num_classes)``) lets
    the label-equality matrix be a one-hot product instead of a broadcast comparison. For
    ``temperature >= 0.05`` the gradient is hand-written (:class:`_SupervisedNTXent`), otherwise
    autograd runs on :func:`nt_xent_autograd`; both are tested against each other.
    """
    dims = {z.shape[1] for z in latents.values()}
    if len(dims) != 1:
        raise ConfigError(f"mcr's contrastive loss needs equal latent sizes, got {sorted(dims)}")
    z = torch.cat(list(latents.values()))
    m = len(latents)
    if temperature < FAST_NT_XENT_MIN_TEMPERATURE:
        same = (labels[:, None] == labels[None, :]).repeat(m, m)
        return nt_xent_autograd(z, same, temperature)
    dtype = _compute_dtype(z)
    if num_classes is not None:  # (F.one_hot would check the labels' range: a device sync)
        one_hot = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
        one_hot.scatter_(1, labels[:, None], 1.0)
        same = one_hot @ one_hot.T
    else:
        same = (labels[:, None] == labels[None, :]).to(dtype)
    return _SupervisedNTXent.apply(z, same, temperature)


# --- permutations ---------------------------------------------------------------------------------
#: On CPU, from this batch size on, ``k`` calls of ``torch.randperm`` (Fisher-Yates, a few us
#: each) beat one batched sort of random keys (the sort costs about 80 ns per element here).
RANDPERM_LOOP_MIN_BATCH = 96


def uniform_permutations(
    k: int, b: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``(k, b)``: ``k`` independent uniformly random permutations of ``range(b)``.

    Two exact samplers, chosen by cost: the argsort of uniform random keys (one call, for GPUs and
    small batches) and, on CPU for ``b >= RANDPERM_LOOP_MIN_BATCH``, ``k`` calls of
    ``torch.randperm``.
    """
    if device.type == "cpu" and b >= RANDPERM_LOOP_MIN_BATCH:
        return torch.stack([torch.randperm(b, generator=generator) for _ in range(k)])
    return torch.rand(k, b, generator=generator, device=device).argsort(dim=1)


def draw_donors(
    targets: Tensor, k: int, kind: str, generator: torch.Generator | None = None
) -> Tensor:
    """``(k, B)`` donor indices: row ``b`` of draw ``i`` takes its perturbed latent from
    ``donors[i, b]``.

    - ``uniform``: ``k`` independent uniform permutations (fixed points allowed);
    - ``derangement``: ``pi o shift o pi^-1`` with a random non-zero cyclic shift, a permutation
      without fixed points in which each row's donor is uniform over the other rows;
    - ``different_label``: each donor drawn uniformly among rows with another target (rows with
      no such row in the batch fall back to any other row, or themselves when ``B = 1``).
    """
    b = targets.shape[0]
    device = targets.device
    if kind == "uniform" or (kind == "derangement" and b < 2):
        return uniform_permutations(k, b, generator, device)
    if kind == "derangement":
        perm = uniform_permutations(k, b, generator, device)
        shift = torch.randint(1, b, (k, 1), generator=generator, device=device)
        pos = (torch.arange(b, device=device) + shift) % b
        donors = torch.empty_like(perm)
        donors.scatter_(1, perm, perm.gather(1, pos))
        return donors
    if kind == "different_label":
        weights = (targets[:, None] != targets[None, :]).float()
        empty = weights.sum(1) == 0
        if bool(empty.any()):
            fallback = 1.0 - torch.eye(b, device=device)
            if b == 1:
                fallback = torch.ones(1, 1, device=device)
            weights[empty] = fallback[empty]
        return torch.multinomial(weights, k, replacement=True, generator=generator).T
    raise ConfigError(f"unknown permutation kind {kind!r}")


def subsets(modalities: tuple[str, ...], which: str) -> list[tuple[str, ...]]:
    """Permuted sets ``S``: all non-empty proper subsets, or singletons plus leave-one-out."""
    m = len(modalities)
    if which == "all":
        sizes = range(1, m)
        return [s for r in sizes for s in itertools.combinations(modalities, r)]
    out = [(x,) for x in modalities]
    out += [tuple(x for x in modalities if x != left) for left in modalities]
    seen: list[tuple[str, ...]] = []
    for s in out:
        if s not in seen:
            seen.append(s)
    return seen


# --- the game's weights ---------------------------------------------------------------------------
def game_weights(
    modalities: tuple[str, ...], sets: list[tuple[str, ...]], strategy: str, lam: float
) -> list[tuple[tuple[str, ...], str | None, float]]:
    """``(S, j, w)`` terms of R_MIPD = ``sum w * D(y_hat_{S->j}, y_hat_ref)`` (``per_mask``).

    ``j`` is the one modality whose latent keeps its gradient (``None``: no mask). Weight ``-lam``
    when ``j`` is in ``S``, ``-k * lam`` otherwise; zero-weight terms are dropped, and the
    collaborative game (``k = 1``) uses one unmasked term per ``S``.
    """
    if strategy == "collaborative":
        return [(s, None, -lam) for s in sets]
    k = STRATEGY_K[strategy]
    terms = []
    for s in sets:
        for j in modalities:
            w = -lam if j in s else -k * lam
            if w != 0.0:
                terms.append((s, j, w))
    return terms


@dataclass(frozen=True)
class SetRouting:
    """The game of :class:`MCRParams.strategy` per permuted set, for the ``per_set`` evaluation.

    Attributes:
        sets: the permuted sets ``S``.
        member: ``member[S][m]`` 1.0 if modality ``m`` is in ``S``, else 0.0.
        inputs: ``w(S, m)``: ``-lam`` if ``m`` is in ``S``, else ``-k * lam``; the factor with which
            modality ``m``'s input to the perturbed prediction of ``S`` receives ``dD_S``.
        shared: ``W_S``: the weight of ``D_S`` in the value, and of the gradient of the head's
            shared parameters and of the summed reference: ``sum_m w(S, m)`` for greedy and
            independent play (the masked terms' weights add up), ``-lam`` for collaborative play
            (one unmasked term per set).
    """

    sets: tuple[tuple[str, ...], ...]
    member: tuple[tuple[float, ...], ...]
    inputs: tuple[tuple[float, ...], ...]
    shared: tuple[float, ...]


def set_routing(
    modalities: tuple[str, ...], sets: Sequence[tuple[str, ...]], strategy: str, lam: float
) -> SetRouting:
    """The :class:`SetRouting` of a game (same gradients as :func:`game_weights`' terms)."""
    k = STRATEGY_K[strategy]
    member = tuple(tuple(1.0 if m in s else 0.0 for m in modalities) for s in sets)
    inputs = tuple(tuple(-lam if m in s else -k * lam for m in modalities) for s in sets)
    if strategy == "collaborative":
        shared = tuple(-lam for _ in sets)
    else:
        shared = tuple(sum(row) for row in inputs)
    return SetRouting(tuple(sets), member, inputs, shared)


# --- per_set evaluation: game routing in the backward pass -----------------------------------------
@dataclass(frozen=True)
class RoutingTensors:
    """A :class:`SetRouting` as tensors of one dtype and device (``S`` sets, ``M`` modalities).

    Attributes:
        member, outside: ``(S, M)`` 1/0 indicators of ``m in S`` and ``m not in S``.
        inputs: ``(S, M)`` ``w(S, m)``.
        shared: ``(S,)`` ``W_S``.
        moved_t, fixed_t: ``(M, S)`` transposes of ``member * inputs`` and ``outside * inputs``.
        ones: ``(S,)`` ones.
    """

    member: Tensor
    outside: Tensor
    inputs: Tensor
    shared: Tensor
    moved_t: Tensor
    fixed_t: Tensor
    ones: Tensor

    @classmethod
    def of(cls, routing: SetRouting, dtype: torch.dtype, device: torch.device) -> RoutingTensors:
        member = torch.tensor(routing.member, dtype=dtype, device=device)
        inputs = torch.tensor(routing.inputs, dtype=dtype, device=device)
        shared = torch.tensor(routing.shared, dtype=dtype, device=device)
        outside = 1.0 - member
        return cls(
            member,
            outside,
            inputs,
            shared,
            (member * inputs).T.contiguous(),
            (outside * inputs).T.contiguous(),
            torch.ones_like(shared),
        )


@dataclass(frozen=True)
class _AdditiveSpec:
    """Static inputs of one :class:`_AdditiveMIPD` call."""

    routing: RoutingTensors
    regression: bool
    reference: str  # summed, masked or detached
    shared_silent: bool  # every W_S is 0 (greedy play, two modalities)


class _AdditiveMIPD(torch.autograd.Function):
    """R_MIPD of an additive head in one node: permutation gather, set mixing, divergence.

    Forward: contributions ``c_m`` ``(B, C)``, donor indices ``(M, R * B)`` (or perturbed
    contributions ``(M, C, R, B)``), the head's shared bias and the reference logits ``(B, C)``;
    the logits of set ``S`` are ``sum_{m in S} c_m[donor] + sum_{m not in S} c_m + bias``
    (class-major ``(S, C, R, B)``), compared with the reference by
    :func:`_set_divergence_forward`. Returns ``(sum_S W_S D_S, D)``.

    Backward, with ``G_S = dD_S/d(logits of S)``: modality ``m``'s perturbed contribution
    receives ``sum_{S contains m} w(S, m) G_S`` (scattered back to the donor rows), its
    unperturbed one ``sum_{S without m} w(S, m) G_S``, the bias ``sum_S W_S G_S``: what the masked
    evaluations of the reference code give (the term ``(S, j)`` detaches every contribution but
    ``j``'s, never the bias). The reference receives ``sum_S W_S dD_S/dv`` (``summed``), nothing
    (``detached``), or (``masked``) is rebuilt from the contributions and the bias inside, which
    receive ``w(S, m)`` and ``W_S`` times the set's reference gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        spec: _AdditiveSpec,
        index: Tensor | None,
        perturbed: Tensor | None,
        bias: Tensor | None,
        ref: Tensor,
        *contributions: Tensor,
    ) -> tuple[Tensor, Tensor]:
        first = contributions[0]
        dtype = spec.routing.shared.dtype
        with torch.autocast(first.device.type, enabled=False):
            anchors = torch.stack(contributions).to(dtype).transpose(1, 2)  # (M, C, B)
            m, c, b = anchors.shape
            member, outside, w_set = spec.routing.member, spec.routing.outside, spec.routing.shared
            s = member.shape[0]
            if index is not None:
                r = index.shape[1] // b
                moved = anchors.gather(2, index.unsqueeze(1).expand(m, c, r * b))
            else:
                assert perturbed is not None
                moved = perturbed.to(dtype)
                r = moved.shape[2]
            fixed = outside @ anchors.reshape(m, c * b)
            if bias is not None:
                fixed = fixed.view(s, c, b).add_(bias.to(dtype).view(1, c, 1))
            u = (member @ moved.reshape(m, c * r * b)).view(s, c, r, b)
            u.add_(fixed.view(s, c, 1, b))
            if spec.reference == "masked":
                v = anchors.sum(0)
                if bias is not None:
                    v = v.add_(bias.to(dtype).view(c, 1))
                v = v.view(1, c, 1, b)
            else:
                v = ref.to(dtype).T.reshape(1, c, 1, b)
            keep_v = spec.reference == "masked" or (
                spec.reference == "summed" and not spec.shared_silent
            )
            per_set, saved = _set_divergence_forward(u, v, spec.regression, keep_v)
            value = (w_set * per_set).sum()
        ctx.spec = spec  # type: ignore[attr-defined]
        ctx.dtypes = (  # type: ignore[attr-defined]
            [t.dtype for t in contributions],
            None if perturbed is None else perturbed.dtype,
            None if bias is None else bias.dtype,
            ref.dtype,
        )
        ctx.save_for_backward(index, *saved)
        ctx.mark_non_differentiable(per_set)
        return value, per_set

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, g_value: Tensor, _g_per_set: Tensor
    ) -> tuple[Tensor | None, ...]:
        spec: _AdditiveSpec = ctx.spec  # type: ignore[attr-defined]
        rt = spec.routing
        index, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        c_dtypes, p_dtype, b_dtype, r_dtype = ctx.dtypes  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        s, m = rt.member.shape
        w_set = rt.shared
        g = g_value.to(w_set.dtype)
        want_v = spec.reference == "masked" or (
            spec.reference == "summed" and needs[4] and not spec.shared_silent
        )
        coef_v = None
        if want_v:
            coef_v = g.expand(s) if spec.reference == "masked" else g * w_set
        gu, gv = _set_divergence_backward(saved, g.expand(s), coef_v)
        assert gu is not None
        _, c, r, b = gu.shape
        g_rows = gu.sum(2)  # (S, C, B)
        bias_rows = None if spec.shared_silent else g_rows
        g_anchor = (rt.fixed_t @ g_rows.view(s, c * b)).view(m, c, b)
        g_moved = (rt.moved_t @ gu.view(s, c * r * b)).view(m, c, r * b)
        g_perturbed = g_ref = None
        if index is not None:
            g_anchor.scatter_add_(2, index.unsqueeze(1).expand(m, c, r * b), g_moved)
        elif needs[2]:
            g_perturbed = g_moved.view(m, c, r, b).to(p_dtype)
        if gv is not None:
            gv_rows = gv.view(s, c, b)
            if spec.reference == "masked":
                g_anchor += (rt.inputs.T @ gv_rows.reshape(s, c * b)).view(m, c, b)
                bias_rows = gv_rows if bias_rows is None else bias_rows + gv_rows
            else:
                g_ref = gv_rows.sum(0).T.to(r_dtype)
        g_bias = None
        if needs[3] and bias_rows is not None:
            g_bias = (w_set @ bias_rows.sum(2)).to(b_dtype)
        grads = g_anchor.transpose(1, 2).unbind(0)
        return (
            None,
            None,
            g_perturbed,
            g_bias,
            g_ref,
            *(gc.to(dt) for gc, dt in zip(grads, c_dtypes, strict=True)),
        )


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` (broadcast)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return g * scale.to(g.dtype), None


def _head_without_gradient(head: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """The head's logits with its parameters detached (its inputs keep their gradient)."""
    detached = {name: p.detach() for name, p in head.named_parameters()}
    return torch.func.functional_call(head, detached, (inputs, ())).logits


def _head_set_logits(
    head: nn.Module,
    latents: Mapping[str, Tensor],
    perturbed: Mapping[str, Tensor],
    rows: int,
    routing: SetRouting,
    with_reference: bool,
) -> tuple[Tensor, Tensor | None, list[int], list[float], list[float]]:
    """Non-additive heads: class-major logits of every set and the game's weights.

    The head's parameters must receive ``W_S`` times ``dD_S`` and modality ``m``'s input
    ``w(S, m)`` times it, from one evaluation per set. For sets with ``W_S != 0`` the inputs'
    gradients are scaled by ``w(S, m) / W_S`` and the logits' by ``W_S`` (in the divergence);
    sets with ``W_S = 0`` (greedy play, ``|S| = M / 2``) are evaluated with detached head
    parameters and input scales ``w(S, m)``. So at most two head evaluations run, each on all
    rows of its group of sets (``with_reference``: plus one unperturbed copy of the batch per set,
    the masked reference).

    Returns ``u`` ``(S, C, R, B)``, the per-set reference ``v`` ``(S, C, 1, B)`` or ``None``, the
    set order (indices into ``routing.sets``) and the logits' and reference's gradient weights.
    """
    mods = tuple(latents)
    b = next(iter(latents.values())).shape[0]
    order: list[int] = []
    w_u: list[float] = []
    us: list[Tensor] = []
    vs: list[Tensor] = []
    extra = 1 if with_reference else 0
    groups = (
        [i for i, w in enumerate(routing.shared) if w != 0.0],
        [i for i, w in enumerate(routing.shared) if w == 0.0],
    )
    for live, idx in zip((True, False), groups, strict=True):
        if not idx:
            continue
        g = len(idx)
        inputs = {}
        for k, m in enumerate(mods):
            z = latents[m]
            d = z.shape[1]
            moved = perturbed[m].view(rows, b, d)
            if extra:
                moved = torch.cat([moved, z.view(1, b, d)])
            inside = torch.tensor([routing.member[i][k] > 0 for i in idx], device=z.device).view(
                g, 1, 1, 1
            )
            x = torch.where(inside, moved.unsqueeze(0), z.view(1, 1, b, d))
            scales = [routing.inputs[i][k] / (routing.shared[i] if live else 1.0) for i in idx]
            if any(sc != 1.0 for sc in scales):
                scale = torch.tensor(scales, dtype=z.dtype, device=z.device).view(g, 1, 1, 1)
                x = _ScaleGradient.apply(x, scale)
            inputs[m] = x.reshape(g * (rows + extra) * b, d)
        logits = head(inputs, ()).logits if live else _head_without_gradient(head, inputs)
        c = logits.shape[1]
        logits = logits.view(g, rows + extra, b, c).permute(0, 3, 1, 2)
        us.append(logits[:, :, :rows])
        if extra:
            vs.append(logits[:, :, rows:])
        order += idx
        w_u += [routing.shared[i] if live else 1.0 for i in idx]
    u = torch.cat(us) if len(us) > 1 else us[0]
    v = (torch.cat(vs) if len(vs) > 1 else vs[0]) if extra else None
    return u.contiguous(), None if v is None else v.contiguous(), order, w_u, list(w_u)


# --- the method -----------------------------------------------------------------------------------
@dataclass
class MCRParams:
    """Options of MCR (names follow the paper; the reference code's names in brackets).

    Attributes:
        lam: lambda_M, the weight of R_MIPD (``l``). Large values (about 5 and more) can make
            SGD diverge as the game maximises divergences; clip gradients (``train.grad_clip``).
        strategy: the game: greedy (k = -1), independent (k = 0), collaborative (k = +1).
        num_permutations: K perturbed copies of the batch per step (``num_samples``).
        permutation: uniform, derangement (no fixed points) or different_label donors.
        subsets: ``all`` non-empty proper subsets (2^M - 2), or ``linear``: singletons and
            leave-one-out sets only (2M, cost linear in M; identical to ``all`` for M <= 3).
        perturbation: permute (MCR), latent_noise, latent_zero, input_noise, input_zero.
        reference: how the unperturbed reference prediction receives gradient (module
            docstring): ``summed`` (the reference code: each set's weight ``W_S``), ``masked``
            (through the same masks as the perturbed prediction: the game as defined) or
            ``detached`` (none).
        evaluation: ``per_set`` (one head evaluation and one divergence per permuted set, the
            masks realised in the backward pass) or ``per_mask`` (the reference code's one per
            set and unmasked modality); the same gradients to rounding, ``per_set`` is cheaper.
        lam_uni: weight of each unimodal head's loss (``multil``).
        lam_con: weight of L_Con (``contr_coeff``).
        temperature: NT-Xent temperature tau.
        contrastive: ``supervised`` (same-label positives) or ``pure`` (same-sample positives).
        lam_ceb: weight of L_CEB (``lib``); 0 disables it and creates no head.
        ceb_input: ``label`` (the paper's h(y)) or ``logits`` (the detached fused logits).
        ceb_hidden: hidden width of the CEB head (default: the largest latent size).
    """

    lam: float = 0.1
    strategy: Strategy = "greedy"
    num_permutations: int = 32
    permutation: Literal["uniform", "derangement", "different_label"] = "uniform"
    subsets: Literal["all", "linear"] = "all"
    perturbation: Literal["permute", "latent_noise", "latent_zero", "input_noise", "input_zero"] = (
        "permute"
    )
    reference: Literal["summed", "masked", "detached"] = "summed"
    evaluation: Literal["per_set", "per_mask"] = "per_set"
    lam_uni: float = 1.0
    lam_con: float = 1.0
    temperature: float = 0.5
    contrastive: Literal["supervised", "pure"] = "supervised"
    lam_ceb: float = 0.0
    ceb_input: Literal["label", "logits"] = "label"
    ceb_hidden: int | None = None

    def __post_init__(self) -> None:
        check(self.lam >= 0, f"method.lam must be >= 0, got {self.lam}")
        check(
            self.num_permutations >= 1,
            f"method.num_permutations must be >= 1, got {self.num_permutations}",
        )
        check(self.lam_uni >= 0, f"method.lam_uni must be >= 0, got {self.lam_uni}")
        check(self.lam_con >= 0, f"method.lam_con must be >= 0, got {self.lam_con}")
        check(self.temperature > 0, f"method.temperature must be > 0, got {self.temperature}")
        check(self.lam_ceb >= 0, f"method.lam_ceb must be >= 0, got {self.lam_ceb}")
        check(
            self.ceb_hidden is None or self.ceb_hidden >= 1,
            f"method.ceb_hidden must be >= 1 or null, got {self.ceb_hidden}",
        )


class CEBHead(nn.Module):
    """``h``: Linear(C -> hidden, no bias), ReLU, Linear(hidden -> sum_m d_m, no bias)."""

    def __init__(self, num_inputs: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_inputs, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, out_dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class Perturbation:
    """The perturbed copies of one step: ``rows`` (R) copies of the batch per modality, given
    either as donor row indices ``(R * B,)`` (permutations) or as values ``(R * B, .)``."""

    rows: int
    index: dict[str, Tensor] | None = None
    values: dict[str, Tensor] | None = None
    #: ``index`` stacked in the model's modality order, ``(M, R * B)``
    index_stack: Tensor | None = None

    def take(self, m: str, base: Tensor) -> Tensor:
        """Modality ``m``'s perturbed tensor ``(R * B, .)`` built from its unperturbed ``base``."""
        if self.index is not None:
            return base[self.index[m]]
        assert self.values is not None
        return self.values[m]


@METHODS.register("mcr")
class MCR(Method):
    """Task + unimodal losses + game-weighted MIPD + supervised contrastive + CEB."""

    name = "mcr"
    Params = MCRParams
    needs_unimodal_heads = True
    search_space = ("method.lam", (0.01, 0.1, 1.0))

    def __init__(self, params: MCRParams | None = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.ceb: CEBHead | None = None
        self._routing_cache: dict[Any, tuple[SetRouting, RoutingTensors]] = {}

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        p: MCRParams = self.params
        if p.lam_con > 0 and len(set(info.latent_dims.values())) != 1:
            raise ConfigError(
                f"method.lam_con > 0 needs equal latent sizes, got {info.latent_dims}"
            )
        if p.lam_ceb > 0:
            out_dim = sum(info.latent_dims.values())
            hidden = p.ceb_hidden or max(info.latent_dims.values())
            self.ceb = CEBHead(info.num_outputs, hidden, out_dim)
            return self.ceb
        return None

    # --- losses --------------------------------------------------------------------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        p: MCRParams = self.params
        out = {"task": ctx.task_loss(output.logits)} | unimodal_losses(output, ctx, p.lam_uni)
        if p.lam > 0:
            out["mipd"] = self.mipd(output, ctx)
        if p.lam_con > 0:
            out["con"] = p.lam_con * self.contrastive_loss(output, ctx)
        if p.lam_ceb > 0:
            out["ceb"] = p.lam_ceb * self.ceb_loss(output, ctx)
        return out

    def contrastive_loss(self, output: ModelOutput, ctx: StepContext) -> Tensor:
        """L_Con. For regression, positives share the sign of the target (``y >= 0`` or not)."""
        p: MCRParams = self.params
        y = ctx.targets
        classes: int | None = None
        if p.contrastive == "pure":
            labels = torch.arange(y.shape[0], device=y.device)
        elif ctx.task == "regression":
            labels, classes = (y >= 0).long(), 2
        else:
            labels, classes = y, output.logits.shape[1]
        return nt_xent(output.latents, labels, p.temperature, classes)

    def ceb_loss(self, output: ModelOutput, ctx: StepContext) -> Tensor:
        """L_CEB = MSE(h(input), concat(z)), the latents not detached."""
        if self.ceb is None:
            raise ConfigError("mcr's CEB head is missing: call setup() before training")
        if self.params.ceb_input == "logits":
            source = output.logits.detach()
        elif ctx.task == "classification":
            source = F.one_hot(ctx.targets, output.logits.shape[1]).to(output.logits.dtype)
        else:
            source = ctx.targets.to(output.logits.dtype)[:, None]
        target = torch.cat([output.latents[m] for m in output.modalities], dim=1)
        return F.mse_loss(self.ceb(source), target)

    # --- R_MIPD --------------------------------------------------------------------------------
    def sample_donors(self, targets: Tensor, modalities: tuple[str, ...]) -> dict[str, Tensor]:
        """Independent ``(K, B)`` donors per modality, from a generator seeded by the global RNG.

        Seeding from the global torch RNG keeps runs reproducible and resumes exact (the trainer
        saves and restores that RNG), while the permutations draw nothing else from it. The
        ``M * K`` permutations are drawn in one call and split by modality.
        """
        drawn = self._draw_donor_stack(targets, len(modalities))
        return {m: drawn[i] for i, m in enumerate(modalities)}

    def _draw_donor_stack(self, targets: Tensor, count: int) -> Tensor:
        """``(count, K, B)`` donors, drawn as :meth:`sample_donors` describes."""
        p: MCRParams = self.params
        seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator(device=targets.device).manual_seed(seed)
        k = p.num_permutations
        drawn = draw_donors(targets, count * k, p.permutation, gen)
        return drawn.reshape(count, k, targets.shape[0])

    def perturbation(
        self, output: ModelOutput, ctx: StepContext, donors: Mapping[str, Tensor] | None
    ) -> Perturbation:
        """This step's perturbed copies: of the contributions for additive heads, of the latents
        otherwise (permutations as indices, which apply to either)."""
        p: MCRParams = self.params
        mods = output.modalities
        if p.perturbation == "permute":
            if donors is None:
                stack = self._draw_donor_stack(ctx.targets, len(mods))
            else:
                stack = torch.stack([donors[m] for m in mods])
            index = stack.view(len(mods), -1)
            return Perturbation(
                stack.shape[1],
                index={m: index[i] for i, m in enumerate(mods)},
                index_stack=index,
            )
        reps = p.num_permutations if p.perturbation.endswith("noise") else 1
        if p.perturbation.startswith("latent"):
            z = output.latents
            if p.perturbation == "latent_noise":
                noisy = {
                    m: z[m].repeat(reps, 1) + torch.randn_like(z[m].repeat(reps, 1)) * _std(z[m])
                    for m in mods
                }
            else:
                noisy = {m: torch.zeros_like(z[m]) for m in mods}
        else:
            if ctx.encode is None or ctx.inputs is None:
                raise ConfigError(
                    f"mcr perturbation={p.perturbation!r} needs ctx.encode and inputs"
                )
            x = ctx.inputs
            if p.perturbation == "input_noise":
                xin = {
                    m: x[m].repeat(reps, *([1] * (x[m].dim() - 1)))
                    + torch.randn((reps * x[m].shape[0], *x[m].shape[1:]), device=x[m].device)
                    * _std(x[m])
                    for m in x
                }
            else:
                xin = {m: torch.zeros_like(x[m]) for m in x}
            noisy = ctx.encode(xin)
        if output.contributions is not None:
            noisy = self._head(ctx).contributions(noisy)
        return Perturbation(reps, values={m: noisy[m] for m in mods})

    def _head(self, ctx: StepContext) -> nn.Module:
        if ctx.fusion is None:
            raise ConfigError("mcr needs ctx.fusion (the fusion head) when method.lam > 0")
        return ctx.fusion  # type: ignore[return-value]

    def mipd(
        self,
        output: ModelOutput,
        ctx: StepContext,
        donors: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """R_MIPD, whose gradient realises the game of :attr:`MCRParams.strategy`.

        ``donors`` (``(K, B)`` per modality) fixes the permutations; by default they are drawn.
        Its value is ``sum_S W_S D_S`` (0 for greedy play with two modalities, module docstring);
        the divergences themselves are logged with :meth:`StepContext.log`:
        ``mcr_div_<m>`` (``D_S`` of the set ``{m}``) and, with more than two modalities,
        ``mcr_div_mean`` (the mean over all permuted sets).
        """
        perturbation = self.perturbation(output, ctx, donors)
        if self.params.evaluation == "per_mask":
            sets, per_set, value = self._mipd_per_mask(output, ctx, perturbation)
        else:
            sets, per_set, value = self._mipd_per_set(output, ctx, perturbation)
        self._log_divergences(ctx, sets, per_set)
        return value

    @staticmethod
    def _log_divergences(
        ctx: StepContext, sets: Sequence[tuple[str, ...]], per_set: Tensor
    ) -> None:
        values = per_set.detach().unbind()
        for s, value in zip(sets, values, strict=True):
            if len(s) == 1:
                ctx.log(f"mcr_div_{s[0]}", value)
        if len({m for s in sets for m in s}) > 2:
            ctx.log("mcr_div_mean", per_set.detach().mean())

    def routing(
        self, modalities: tuple[str, ...], device: torch.device, dtype: torch.dtype
    ) -> tuple[SetRouting, RoutingTensors]:
        """The game's :class:`SetRouting` and its tensors (cached per modalities, device, dtype)."""
        key = (modalities, device, dtype)
        if key not in self._routing_cache:
            p: MCRParams = self.params
            routing = set_routing(modalities, subsets(modalities, p.subsets), p.strategy, p.lam)
            self._routing_cache[key] = (routing, RoutingTensors.of(routing, dtype, device))
        return self._routing_cache[key]

    def _mipd_per_set(
        self, output: ModelOutput, ctx: StepContext, perturbation: Perturbation
    ) -> tuple[Sequence[tuple[str, ...]], Tensor, Tensor]:
        """One head evaluation and one divergence per permuted set (module docstring)."""
        p: MCRParams = self.params
        head = self._head(ctx)
        mods = output.modalities
        ref = output.logits
        if p.reference == "detached":
            ref = ref.detach()
        routing, w = self.routing(mods, ref.device, _compute_dtype(ref))
        silent = not any(routing.shared)
        if output.contributions is not None:
            contributions = [output.contributions[m] for m in mods]
            index = perturbed = None
            if perturbation.index_stack is not None:
                index = perturbation.index_stack  # (M, R * B)
            else:
                assert perturbation.values is not None
                b, c = ref.shape
                stacked = torch.stack([perturbation.values[m] for m in mods])  # (M, R * B, C)
                perturbed = stacked.transpose(1, 2).reshape(len(mods), c, perturbation.rows, b)
            spec = _AdditiveSpec(w, ctx.task == "regression", p.reference, silent)
            bias = getattr(head, "bias", None)
            value, per_set = _AdditiveMIPD.apply(spec, index, perturbed, bias, ref, *contributions)
            return routing.sets, per_set, value
        latents = output.latents
        r = perturbation.rows
        b, c = ref.shape
        moved = {m: perturbation.take(m, latents[m]) for m in mods}
        u, v, order, w_u_list, w_v_list = _head_set_logits(
            head, latents, moved, r, routing, p.reference == "masked"
        )
        dev, dt = w.shared.device, w.shared.dtype
        w_value = torch.tensor([routing.shared[i] for i in order], dtype=dt, device=dev)
        w_u = torch.tensor(w_u_list, dtype=dt, device=dev)
        if v is None:
            v, w_v = ref.T.reshape(1, c, 1, b), w_value
        else:
            w_v, silent = torch.tensor(w_v_list, dtype=dt, device=dev), False
        value, per_set = set_divergences(u, v, w_u, w_v, w_value, ctx.task, v_silent=silent)
        return [routing.sets[i] for i in order], per_set, value

    def _mipd_per_mask(
        self, output: ModelOutput, ctx: StepContext, perturbation: Perturbation
    ) -> tuple[Sequence[tuple[str, ...]], Tensor, Tensor]:
        """The reference code's evaluation: one head evaluation per term ``(S, j)``."""
        p: MCRParams = self.params
        head = self._head(ctx)
        mods = output.modalities
        additive = output.contributions is not None
        base = output.contributions if additive else output.latents
        assert base is not None
        reps = perturbation.rows
        anchor = {m: base[m].repeat(reps, 1) for m in mods}
        perturbed = {m: perturbation.take(m, base[m]) for m in mods}
        sets = subsets(mods, p.subsets)
        terms = game_weights(mods, sets, p.strategy, p.lam)
        logits, refs = [], []
        for s, j, _ in terms:
            parts = {m: (perturbed[m] if m in s else anchor[m]) for m in mods}
            stop = () if j is None else tuple(m for m in mods if m != j)
            if additive:
                parts = {m: (v.detach() if m in stop else v) for m, v in parts.items()}
                logits.append(head.combine(parts))
            else:
                logits.append(head(parts, stop).logits)
            if p.reference == "masked" and j is not None:
                refs.append(self._masked_reference(head, base, stop, additive).repeat(reps, 1))
            elif p.reference == "detached":
                refs.append(output.logits.detach().repeat(reps, 1))
            else:
                refs.append(output.logits.repeat(reps, 1))
        n_terms = len(terms)
        rows = divergence_rows(torch.cat(logits), torch.cat(refs), ctx.task)
        per_term = rows.reshape(n_terms, -1).mean(1)
        weights = torch.tensor([w for _, _, w in terms], dtype=per_term.dtype, device=rows.device)
        first = {}
        for i, (s, _, _) in enumerate(terms):
            first.setdefault(s, i)
        per_set = per_term.detach()[torch.tensor(list(first.values()), device=rows.device)]
        return list(first), per_set, (weights * per_term).sum()

    @staticmethod
    def _masked_reference(
        head: nn.Module, base: Mapping[str, Tensor], stop: tuple[str, ...], additive: bool
    ) -> Tensor:
        """The unperturbed prediction with the modalities in ``stop`` detached."""
        if additive:
            return head.combine({m: (v.detach() if m in stop else v) for m, v in base.items()})
        return head(dict(base), stop).logits


def _std(x: Tensor) -> Tensor:
    """Per-feature standard deviation over the batch (zero for a batch of one), no gradient."""
    if x.shape[0] < 2:
        return torch.zeros_like(x[:1])
    return x.detach().std(dim=0, keepdim=True)
