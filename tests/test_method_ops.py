"""The shared pieces of methods/ops/ against autograd: every hand-written backward pass is checked
with ``torch.autograd.gradcheck`` in float64 where it is the derivative of its value, and against
autograd on the separated losses where it routes the gradient (MCR's game)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mmbalance.methods.ops.contrastive import SupervisedNTXent, nt_xent_autograd
from mmbalance.methods.ops.divergence import divergence_rows, set_divergences
from mmbalance.methods.ops.gradients import scale_grad
from mmbalance.methods.ops.mcr_game import (
    AdditiveMIPD,
    AdditiveSpec,
    RoutingTensors,
    game_weights,
    set_routing,
    subsets,
)

F64 = torch.float64


def _randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_(True)


# --- divergences -------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("shared_v", [True, False])
def test_set_divergences_backward_is_the_derivative_of_its_value(task: str, shared_v: bool) -> None:
    """With every gradient weight equal to the value's weight, the hand-written backward is the
    plain derivative: gradcheck in float64 on both inputs."""
    s, c, r, b = 3, 4, 2, 5
    u = _randn(s, c, r, b, seed=0, scale=2.0)
    v = _randn(1 if shared_v else s, c, 1, b, seed=1, scale=2.0)
    w = torch.tensor([0.7, -1.3, 0.4], dtype=F64)

    def value(u: Tensor, v: Tensor) -> Tensor:
        return set_divergences(u, v, w, w, w, task)[0]

    assert torch.autograd.gradcheck(value, (u, v))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_set_divergences_route_each_input_its_own_weights(task: str) -> None:
    """Other weights route the gradient: ``u`` of set S receives ``w_u[S] dD_S/du`` and the shared
    ``v`` the sum of ``w_v[S] dD_S/dv``, as autograd gives on the separated losses; the value is
    ``sum_S w_value[S] D_S`` with ``D_S`` the mean row divergence of the plain formula."""
    s, c, r, b = 3, 4, 2, 5
    u = _randn(s, c, r, b, seed=2, scale=2.0)
    v = _randn(1, c, 1, b, seed=3, scale=2.0)
    w_u = torch.tensor([0.5, -2.0, 1.5], dtype=F64)
    w_v = torch.tensor([-1.0, 0.25, 3.0], dtype=F64)
    w_value = torch.tensor([2.0, 1.0, -0.5], dtype=F64)
    value, per_set = set_divergences(u, v, w_u, w_v, w_value, task)
    got_u, got_v = torch.autograd.grad(value, (u, v))

    def plain(uu: Tensor, vv: Tensor, i: int) -> Tensor:  # D_S by the row formula
        rows_u = uu[i].permute(1, 2, 0).reshape(r * b, c)
        rows_v = vv[0].permute(1, 2, 0).expand(r, b, c).reshape(r * b, c)
        return divergence_rows(rows_u, rows_v, task).mean()

    expected = torch.stack([plain(u, v, i) for i in range(s)])
    torch.testing.assert_close(per_set, expected.detach())
    torch.testing.assert_close(value, (w_value * expected).sum())
    loss_u = sum(w_u[i] * plain(u, v.detach(), i) for i in range(s))
    loss_v = sum(w_v[i] * plain(u.detach(), v, i) for i in range(s))
    torch.testing.assert_close(got_u, torch.autograd.grad(loss_u, u)[0])
    torch.testing.assert_close(got_v, torch.autograd.grad(loss_v, v)[0])


# --- MCR's additive routing ----------------------------------------------------------------------
def _additive_inputs(m: int, seed: int) -> tuple[list[Tensor], Tensor, Tensor, Tensor, int]:
    b, c, r = 5, 3, 2
    contributions = [_randn(b, c, seed=seed + k) for k in range(m)]
    bias = _randn(c, seed=seed + 10)
    ref = _randn(b, c, seed=seed + 11)
    g = torch.Generator().manual_seed(seed + 12)
    index = torch.stack([torch.randint(b, (r * b,), generator=g) for _ in range(m)])
    return contributions, bias, ref, index, r


def _mipd(strategy: str, reference: str, mods: tuple[str, ...], lam: float = 0.7):
    routing = set_routing(mods, subsets(mods, "all"), strategy, lam)
    tensors = RoutingTensors.of(routing, F64, torch.device("cpu"))
    spec = AdditiveSpec(tensors, False, reference, not any(routing.shared))

    def value(index: Tensor, bias: Tensor, ref: Tensor, *contributions: Tensor) -> Tensor:
        return AdditiveMIPD.apply(spec, index, None, bias, ref, *contributions)[0]

    return routing, value


@pytest.mark.parametrize("reference", ["summed", "masked", "detached"])
@pytest.mark.parametrize("m", [2, 3])
def test_additive_mipd_backward_is_the_derivative_under_collaborative_play(
    m: int, reference: str
) -> None:
    """Collaborative play weighs every input of a set like the set itself, so the routed
    gradient is the derivative of the value: gradcheck of the hand-written node in float64 (the
    gather, the set mixing, the bias and, as ``reference`` says, the reference path)."""
    mods = tuple(f"m{i}" for i in range(m))
    contributions, bias, ref, index, _ = _additive_inputs(m, seed=20)
    _, value = _mipd("collaborative", reference, mods)
    if reference != "summed":  # the node rebuilds or stops the reference: it gets no gradient
        ref = ref.detach()

    def f(bias: Tensor, ref: Tensor, *contributions: Tensor) -> Tensor:
        return value(index, bias, ref, *contributions)

    assert torch.autograd.gradcheck(f, (bias, ref, *contributions))


@pytest.mark.parametrize("reference", ["summed", "masked", "detached"])
@pytest.mark.parametrize("strategy", ["greedy", "independent", "collaborative"])
@pytest.mark.parametrize("m", [2, 3])
def test_additive_mipd_routes_the_game_of_the_separated_masked_terms(
    m: int, strategy: str, reference: str
) -> None:
    """Every game: the node's gradients equal autograd on the separated terms ``(S, j, w)`` of
    :func:`game_weights`, each ``w * D_S`` evaluated with every contribution but ``j``'s detached
    (the reference code's masks; the bias is never detached), the reference summed, rebuilt
    through the same masks, or detached; its value is ``sum_S W_S D_S``."""
    mods = tuple(f"m{i}" for i in range(m))
    contributions, bias, ref, index, r = _additive_inputs(m, seed=40)
    routing, value = _mipd(strategy, reference, mods)
    inputs = [bias, ref, *contributions]
    got = torch.autograd.grad(value(index, *inputs), inputs, allow_unused=True)

    def divergence(s: tuple[str, ...], j: str | None) -> Tensor:
        kept = [c if j is None or mods[k] == j else c.detach() for k, c in enumerate(contributions)]
        rows = sum(kept[k][index[k]] if mods[k] in s else kept[k].repeat(r, 1) for k in range(m))
        if reference == "masked":
            reference_rows = sum(kept) + bias
        else:
            reference_rows = ref if reference == "summed" else ref.detach()
        return divergence_rows(rows + bias, reference_rows.repeat(r, 1), "classification").mean()

    terms = game_weights(mods, list(routing.sets), strategy, 0.7)
    total = sum(w * divergence(s, j) for s, j, w in terms)
    expected = torch.autograd.grad(total, inputs, allow_unused=True)
    for name, a, e in zip(["bias", "ref", *mods], got, expected, strict=True):
        # a path the game gives no weight (greedy play with two modalities: W_S = 0) gets None
        # from the node and an exact zero from the separated terms
        a = torch.zeros_like(inputs[0]) if a is None and e is not None and e.ndim == 1 else a
        if e is None or a is None:
            assert (e is None or not e.abs().any()) and (a is None or not a.abs().any()), name
        else:
            torch.testing.assert_close(a, e, msg=name)
    sets = [divergence(s, None).detach() for s in routing.sets]
    shared = torch.tensor(routing.shared, dtype=F64)
    torch.testing.assert_close(value(index, *inputs).detach(), (shared * torch.stack(sets)).sum())


# --- NT-Xent and gradient scaling ----------------------------------------------------------------
@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1], [1, 1, 1, 0, 1]])
@pytest.mark.parametrize("m", [2, 3])
def test_nt_xent_backward_passes_gradcheck(m: int, labels: list[int]) -> None:
    y = torch.tensor(labels)
    same = (y[:, None] == y[None, :]).to(F64)
    z = _randn(m * len(labels), 4, seed=60)

    def loss(z: Tensor) -> Tensor:
        return SupervisedNTXent.apply(z, same, 0.5)

    assert torch.autograd.gradcheck(loss, (z,))
    lab = y.repeat(m)
    autograd = nt_xent_autograd(z, lab[:, None] == lab[None, :], 0.5)
    torch.testing.assert_close(loss(z), autograd)


def test_scale_grad_routes_a_broadcast_factor_and_keeps_the_value() -> None:
    x = _randn(3, 2, 4, seed=70)
    k = torch.tensor([0.5, -2.0, 3.0], dtype=F64).view(3, 1, 1)
    y = scale_grad(x, k)
    assert torch.equal(y, x)
    upstream = _randn(3, 2, 4, seed=71).detach()
    (grad,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(grad, upstream * k)
