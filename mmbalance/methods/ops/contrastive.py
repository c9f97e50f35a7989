"""Supervised NT-Xent over the latents of every modality (MCR's L_Con).

:func:`nt_xent` pools the ``M * B`` L2-normalised latents; rows with the same label are
positives, rows with another label negatives. Its gradient is written by hand
(:class:`SupervisedNTXent`: one autograd node, the ``N x N`` work in place, the label mask applied
through the block structure and never materialised) for temperatures from
:data:`FAST_NT_XENT_MIN_TEMPERATURE` on, and autograd runs on the log-space formulation
:func:`nt_xent_autograd` below it; ``tests/test_method_ops.py`` checks the two against each other
and the hand-written backward with ``gradcheck`` in float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from mmbalance.errors import ConfigError
from mmbalance.methods.ops.precision import compute_dtype

#: The hand-differentiated NT-Xent needs ``exp(-2 / temperature)`` to stay a normal float (no
#: underflow, whose slow path costs about 100x on CPU); below this temperature the plain autograd
#: formulation in log space is used.
FAST_NT_XENT_MIN_TEMPERATURE = 0.05


class SupervisedNTXent(torch.autograd.Function):
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
        dtype = compute_dtype(z)
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
        grad.diagonal().zero_()
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
    ``temperature >= 0.05`` the gradient is hand-written (:class:`SupervisedNTXent`), otherwise
    autograd runs on :func:`nt_xent_autograd`; both are tested against each other.
    """
    dims = {z.shape[1] for z in latents.values()}
    if len(dims) != 1:
        raise ConfigError(f"the contrastive loss needs equal latent sizes, got {sorted(dims)}")
    z = torch.cat(list(latents.values()))
    m = len(latents)
    if temperature < FAST_NT_XENT_MIN_TEMPERATURE:
        same = (labels[:, None] == labels[None, :]).repeat(m, m)
        return nt_xent_autograd(z, same, temperature)
    dtype = compute_dtype(z)
    if num_classes is not None:  # (F.one_hot would check the labels' range: a device sync)
        one_hot = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
        one_hot.scatter_(1, labels[:, None], 1.0)
        same = one_hot @ one_hot.T
    else:
        same = (labels[:, None] == labels[None, :]).to(dtype)
    return SupervisedNTXent.apply(z, same, temperature)
