"""MCR's game: which sets are perturbed, by which donors, with which weights, and how the
weights are routed through the backward pass.

- **Sets and donors.** :func:`subsets` lists the permuted sets ``S``; :func:`draw_donors` draws
  the within-batch donors of each perturbed copy (uniform permutations, derangements or donors
  with another label), and :class:`Perturbation` holds one step's perturbed copies.
- **Game weights.** Encoder ``j`` descends ``lam * (sum_{S contains j} L_S + k * sum_{S without
  j} L_S)`` (greedy ``k = -1``, independent 0, collaborative +1). :func:`game_weights` lists the
  terms ``(S, j, w)`` of the reference code's masked evaluations (``per_mask``: the head with
  every modality but ``j`` detached); :class:`SetRouting` holds the same game per set: the input
  weights ``w(S, m)`` and the set weight ``W_S`` (module docstring of :mod:`mmbalance.methods.mcr`).
- **Routing** (``per_set``). For a fixed ``S`` every masked term has the same forward value, so
  the head and the divergence run once per set and the masks are realised in the backward pass:
  :class:`AdditiveMIPD` does gather, set mixing and divergence of an additive head in one node
  whose backward is written by hand; :func:`head_set_logits` evaluates any other head on every
  set at once with its inputs' gradients scaled (:func:`~mmbalance.methods.ops.gradients.
  scale_grad`). ``tests/test_method_ops.py`` checks the hand-written backward against autograd,
  ``tests/test_mcr.py`` both evaluations against each other and against the game rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from mmbalance.errors import ConfigError
from mmbalance.methods.ops.divergence import set_divergence_backward, set_divergence_forward
from mmbalance.methods.ops.gradients import scale_grad

Strategy = Literal["greedy", "independent", "collaborative"]
STRATEGY_K: dict[str, float] = {"greedy": -1.0, "independent": 0.0, "collaborative": 1.0}


# --- donors ------------------------------------------------------------------------------------
#: On CPU, from this many elements (``k * b``) on, NumPy's Fisher-Yates shuffle of every row
#: (``Generator.permuted``, a few ns per element plus about 40 us to seed) beats one batched
#: sort of random keys (about 40-80 ns per element here).
NUMPY_SHUFFLE_MIN_ELEMENTS = 1024


def uniform_permutations(
    k: int, b: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``(k, b)``: ``k`` independent uniformly random permutations of ``range(b)``.

    Two exact samplers, chosen by cost: the argsort of uniform random keys (one call, for GPUs and
    few elements) and, on CPU for ``k * b >= NUMPY_SHUFFLE_MIN_ELEMENTS``, NumPy's Fisher-Yates
    shuffle of each row (``numpy.random.Generator.permuted``, unbiased bounded integers) from a
    PCG64 generator seeded by one draw of ``generator``, so the permutations are reproducible
    from ``generator`` alike.
    """
    if device.type == "cpu" and k * b >= NUMPY_SHUFFLE_MIN_ELEMENTS:
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        rows = np.tile(np.arange(b, dtype=np.int64), (k, 1))  # C order, shuffled in place
        np.random.Generator(np.random.PCG64(seed)).permuted(rows, axis=1, out=rows)
        return torch.from_numpy(rows)
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
    """The game of MCR's ``strategy`` per permuted set, for the ``per_set`` evaluation.

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
class AdditiveSpec:
    """Static inputs of one :class:`AdditiveMIPD` call."""

    routing: RoutingTensors
    regression: bool
    reference: str  # summed, masked or detached
    shared_silent: bool  # every W_S is 0 (greedy play, two modalities)


class AdditiveMIPD(torch.autograd.Function):
    """R_MIPD of an additive head in one node: permutation gather, set mixing, divergence.

    Forward: contributions ``c_m`` ``(B, C)``, donor indices ``(M, R * B)`` (or perturbed
    contributions ``(M, C, R, B)``), the head's shared bias and the reference logits ``(B, C)``;
    the logits of set ``S`` are ``sum_{m in S} c_m[donor] + sum_{m not in S} c_m + bias``
    (class-major ``(S, C, R, B)``), compared with the reference by
    :func:`set_divergence_forward`. Returns ``(sum_S W_S D_S, D)``.

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
        spec: AdditiveSpec,
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
            per_set, saved = set_divergence_forward(u, v, spec.regression, keep_v)
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
        spec: AdditiveSpec = ctx.spec  # type: ignore[attr-defined]
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
        gu, gv = set_divergence_backward(saved, g.expand(s), coef_v)
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


def _head_without_gradient(head: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """The head's logits with its parameters detached (its inputs keep their gradient)."""
    detached = {name: p.detach() for name, p in head.named_parameters()}
    return torch.func.functional_call(head, detached, (inputs, ())).logits


def head_set_logits(
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
                x = scale_grad(x, scale)
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
