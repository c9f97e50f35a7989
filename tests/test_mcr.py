"""MCR: gradient identities of the game, JSD, contrastive and CEB values, equivalences, learning."""

from __future__ import annotations

import csv
import itertools
import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mmbalance.builder import resolve_config
from mmbalance.config import load_yaml
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS, ModelInfo, StepContext
from mmbalance.methods.base import total_loss
from mmbalance.methods.mcr import MCR
from mmbalance.methods.ops import mcr_game
from mmbalance.methods.ops.contrastive import nt_xent, nt_xent_autograd
from mmbalance.methods.ops.divergence import jsd, jsd_rows
from mmbalance.methods.ops.mcr_game import draw_donors, subsets, uniform_permutations
from mmbalance.models import MultimodalModel, build_fusion
from mmbalance.train import fit

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {"greedy": -1.0, "independent": 0.0, "collaborative": 1.0}
FUSIONS = ["late_sum", "concat_linear", "concat_mlp", "film", "gated", "transformer"]


def make_model(m: int, fusion: str, d: int = 6, c: int = 4, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    names = [f"m{i + 1}" for i in range(m)]
    encoders = {n: nn.Sequential(nn.Linear(5, d), nn.Tanh()) for n in names}
    params = {"d_model": 8, "heads": 2, "layers": 1} if fusion == "transformer" else {}
    head = build_fusion(fusion, {n: d for n in names}, c, params)
    return MultimodalModel(encoders, head, unimodal_heads=True)


def make_method(model: MultimodalModel, **kw: object) -> MCR:
    method = MCR(**kw)
    info = ModelInfo(model.modalities, dict(model.fusion.latent_dims), model.fusion.num_outputs)
    method.setup(info)
    return method


def batch(model: MultimodalModel, b: int = 8, seed: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(b, 5, generator=g) for m in model.modalities}
    y = torch.randint(0, model.fusion.num_outputs, (b,), generator=g)
    return x, y


def ctx_for(model: MultimodalModel, x: dict[str, Tensor], y: Tensor) -> StepContext:
    return StepContext.standalone(y, fusion=model.fusion, encode=model.encode, inputs=x)


def enc_grads(model: MultimodalModel, loss: Tensor, m: str) -> list[Tensor]:
    params = list(model.encoders[m].parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def all_grads(model: MultimodalModel, loss: Tensor) -> dict[str, Tensor]:
    """Gradient of ``loss`` for every parameter of the model (encoders and heads)."""
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for n, p, g in zip(names, params, grads, strict=True)
    }


def set_weight(strategy: str, lam: float, m: int, size: int) -> float:
    """W_S of a set of ``size`` modalities: sum of its input weights, or -lam (collaborative)."""
    if strategy == "collaborative":
        return -lam
    k = STRATEGIES[strategy]
    return -lam * size - k * lam * (m - size)


def permuted_latents(
    z: dict[str, Tensor], donors: dict[str, Tensor], s: tuple[str, ...], reps: int
) -> dict[str, Tensor]:
    return {n: (z[n][donors[n].reshape(-1)] if n in s else z[n].repeat(reps, 1)) for n in z}


# --- the game: gradient identities against autograd on the separated losses -------------------------
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("fusion", ["late_sum", "concat_linear", "concat_mlp", "transformer"])
def test_encoder_gradient_matches_game_rule(strategy: str, m: int, fusion: str) -> None:
    model = make_model(m, fusion)
    lam, k = 0.7, STRATEGIES[strategy]
    method = make_method(
        model, lam=lam, strategy=strategy, num_permutations=3, reference="detached"
    )
    x, y = batch(model)
    ctx = ctx_for(model, x, y)
    out = model(x)
    torch.manual_seed(5)
    donors = method.sample_donors(y, model.modalities)
    reg = method.mipd(out, ctx, donors)

    # Right-hand side: each L_MIPD,S = -mean JSD(full head on S-permuted latents, ref) unmasked.
    z = out.latents
    ref = out.logits.detach().repeat(3, 1)
    sets = [s for r in range(1, m) for s in itertools.combinations(model.modalities, r)]
    l_s = {}
    for s in sets:
        perm = {
            n: (z[n][donors[n].reshape(-1)] if n in s else z[n].repeat(3, 1))
            for n in model.modalities
        }
        l_s[s] = -jsd(model.fusion(perm).logits, ref)
    for j in model.modalities:
        lhs = enc_grads(model, reg, j)
        rhs = [torch.zeros_like(g) for g in lhs]
        for s, loss in l_s.items():
            w = lam if j in s else k * lam
            for acc, g in zip(rhs, enc_grads(model, loss, j), strict=True):
                acc += w * g
        for a, b in zip(lhs, rhs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in enc_grads(model, reg, model.modalities[1]))


@pytest.mark.parametrize("fusion", ["late_sum", "concat_linear"])
def test_greedy_two_modalities_no_gradient_to_reference_or_bias(fusion: str) -> None:
    model = make_model(2, fusion)
    x, y = batch(model)
    out = model(x)
    leaf = out.logits.detach().requires_grad_(True)
    out.logits = leaf
    bias = model.fusion.bias
    for strategy, expect_zero in (("greedy", True), ("independent", False)):
        method = make_method(model, lam=1.0, strategy=strategy, num_permutations=4)
        torch.manual_seed(3)
        reg = method.mipd(out, ctx_for(model, x, y))
        grads = torch.autograd.grad(reg, [leaf, bias], retain_graph=True, allow_unused=True)
        size = sum(0.0 if g is None else float(g.abs().max()) for g in grads)
        if expect_zero:
            assert size < 1e-7
        else:
            assert size > 1e-4


def test_masked_evaluations_do_not_change_forward_values() -> None:
    """R_MIPD for greedy M=2 equals lam * sum over masks of signed JSD = 0 in value (pairs cancel)."""
    model = make_model(2, "late_sum")
    x, y = batch(model)
    method = make_method(model, lam=1.0, strategy="greedy", num_permutations=4)
    reg = method.mipd(model(x), ctx_for(model, x, y))
    assert abs(float(reg.detach())) < 1e-7
    method = make_method(model, lam=1.0, strategy="independent", num_permutations=4)
    assert float(method.mipd(model(x), ctx_for(model, x, y)).detach()) < -1e-4


# --- per-set evaluation: the same gradients as the masked evaluations ------------------------------
@pytest.mark.parametrize("reference", ["summed", "masked", "detached"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_per_set_evaluation_equals_per_mask(
    fusion: str, m: int, strategy: str, reference: str
) -> None:
    """One head evaluation and one divergence per set give every parameter (encoders, fusion and
    unimodal heads) the gradient of the reference code's masked evaluations, and the same value
    and logged divergences."""
    model = make_model(m, fusion).double()
    x, y = batch(model)
    x = {k: v.double() for k, v in x.items()}
    out = model(x)
    opts = {"lam": 0.7, "strategy": strategy, "num_permutations": 3, "reference": reference}
    per_set = make_method(model, **opts)
    per_mask = make_method(model, **opts, evaluation="per_mask")
    torch.manual_seed(2)
    donors = per_set.sample_donors(y, model.modalities)
    ctx_set, ctx_mask = ctx_for(model, x, y), ctx_for(model, x, y)
    value_set = per_set.mipd(out, ctx_set, donors)
    value_mask = per_mask.mipd(out, ctx_mask, donors)
    torch.testing.assert_close(value_set, value_mask, rtol=1e-10, atol=1e-12)
    assert set(ctx_set.logs) == set(ctx_mask.logs)
    for name, logged in ctx_set.logs.items():
        torch.testing.assert_close(logged, ctx_mask.logs[name], rtol=1e-10, atol=1e-12)
    got, expected = all_grads(model, value_set), all_grads(model, value_mask)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)
    assert any(float(g.abs().max()) > 1e-6 for n, g in got.items() if n.startswith("encoders."))


@pytest.mark.parametrize("perturbation", ["latent_noise", "latent_zero", "input_noise"])
@pytest.mark.parametrize("fusion", ["late_sum", "gated"])
def test_per_set_equals_per_mask_for_other_perturbations(perturbation: str, fusion: str) -> None:
    model = make_model(3, fusion).double()
    x, y = batch(model)
    x = {k: v.double() for k, v in x.items()}
    opts = {"lam": 0.5, "strategy": "greedy", "num_permutations": 2, "perturbation": perturbation}
    values = {}
    for evaluation in ("per_set", "per_mask"):
        method = make_method(model, **opts, evaluation=evaluation)
        torch.manual_seed(4)  # the same noise for both
        values[evaluation] = method.mipd(model(x), ctx_for(model, x, y))
    torch.testing.assert_close(values["per_set"], values["per_mask"], rtol=1e-10, atol=1e-12)
    got, expected = all_grads(model, values["per_set"]), all_grads(model, values["per_mask"])
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("evaluation", ["per_set", "per_mask"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("fusion", ["late_sum", "concat_mlp", "gated"])
def test_masked_reference_realises_the_game_over_both_paths(
    fusion: str, m: int, strategy: str, evaluation: str
) -> None:
    """``reference="masked"``: encoder j receives exactly
    lam * (sum_{S contains j} grad_j L_S + k * sum_{S without j} grad_j L_S), with
    L_S = -JSD(head(z with S permuted), head(z)) differentiated through both predictions."""
    model = make_model(m, fusion).double()
    lam, k = 0.7, STRATEGIES[strategy]
    method = make_method(
        model,
        lam=lam,
        strategy=strategy,
        num_permutations=3,
        reference="masked",
        evaluation=evaluation,
    )
    x, y = batch(model)
    x = {n: v.double() for n, v in x.items()}
    out = model(x)
    torch.manual_seed(5)
    donors = method.sample_donors(y, model.modalities)
    reg = method.mipd(out, ctx_for(model, x, y), donors)
    z = out.latents
    ref = model.fusion(z).logits.repeat(3, 1)  # a separate, live evaluation of the reference
    sets = [s for r in range(1, m) for s in itertools.combinations(model.modalities, r)]
    l_s = {s: -jsd(model.fusion(permuted_latents(z, donors, s, 3)).logits, ref) for s in sets}
    for j in model.modalities:
        lhs = enc_grads(model, reg, j)
        rhs = [torch.zeros_like(g) for g in lhs]
        for s, loss in l_s.items():
            w = lam if j in s else k * lam
            for acc, g in zip(rhs, enc_grads(model, loss, j), strict=True):
                acc += w * g
        for a, b in zip(lhs, rhs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert sum(float(g.abs().sum()) for g in lhs) > 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("fusion", ["late_sum", "concat_mlp"])
def test_summed_reference_receives_the_set_weight(fusion: str, m: int, strategy: str) -> None:
    """The default (the reference code's convention): the perturbed path of set S reaches encoder
    j with weight w(S, j), the reference path with the set weight W_S = sum_m w(S, m)
    (collaborative: -lam), whatever j."""
    model = make_model(m, fusion).double()
    lam, k = 0.7, STRATEGIES[strategy]
    method = make_method(model, lam=lam, strategy=strategy, num_permutations=3)
    x, y = batch(model)
    x = {n: v.double() for n, v in x.items()}
    out = model(x)
    torch.manual_seed(6)
    donors = method.sample_donors(y, model.modalities)
    reg = method.mipd(out, ctx_for(model, x, y), donors)
    z = out.latents
    ref = out.logits.repeat(3, 1)
    sets = [s for r in range(1, m) for s in itertools.combinations(model.modalities, r)]
    perturbed = {s: model.fusion(permuted_latents(z, donors, s, 3)).logits for s in sets}
    for j in model.modalities:
        rhs = [torch.zeros_like(g) for g in enc_grads(model, reg, j)]
        for s, u in perturbed.items():
            w_input = -lam if j in s else -k * lam
            w_set = set_weight(strategy, lam, m, len(s))
            pieces = ((w_input, jsd(u, ref.detach())), (w_set, jsd(u.detach(), ref)))
            for w, loss in pieces:
                for acc, g in zip(rhs, enc_grads(model, loss, j), strict=True):
                    acc += w * g
        for a, b in zip(enc_grads(model, reg, j), rhs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_divergences_are_logged_and_the_greedy_two_modality_value_is_zero() -> None:
    """Greedy play, M = 2: the term's value is exactly 0 (W_S = 0 for both sets) while its
    gradient is not; the divergences themselves are logged per step."""
    model = make_model(2, "late_sum")
    x, y = batch(model)
    out = model(x)
    method = make_method(model, lam=1.0, strategy="greedy", num_permutations=4)
    torch.manual_seed(7)
    donors = method.sample_donors(y, model.modalities)
    ctx = ctx_for(model, x, y)
    reg = method.mipd(out, ctx, donors)
    assert float(reg.detach()) == 0.0
    assert sum(float(g.abs().sum()) for g in enc_grads(model, reg, "m1")) > 0
    ref = out.logits.detach().repeat(4, 1)
    for m in model.modalities:
        expected = jsd(model.fusion(permuted_latents(out.latents, donors, (m,), 4)).logits, ref)
        assert float(ctx.logs[f"mcr_div_{m}"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(ctx.logs[f"mcr_div_{m}"]) > 1e-4
    model3 = make_model(3, "late_sum")
    x3, y3 = batch(model3)
    ctx3 = ctx_for(model3, x3, y3)
    method3 = make_method(model3, lam=1.0, strategy="greedy", num_permutations=2)
    torch.manual_seed(8)
    donors3 = method3.sample_donors(y3, model3.modalities)
    out3 = model3(x3)
    method3.mipd(out3, ctx3, donors3)
    ref3 = out3.logits.detach().repeat(2, 1)
    sets3 = [s for r in (1, 2) for s in itertools.combinations(model3.modalities, r)]
    divs = [
        jsd(model3.fusion(permuted_latents(out3.latents, donors3, s, 2)).logits, ref3)
        for s in sets3
    ]
    assert float(ctx3.logs["mcr_div_mean"]) == pytest.approx(float(torch.stack(divs).mean()))


# --- JSD ---------------------------------------------------------------------------------------------
def test_jsd_hand_value() -> None:
    u = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[math.log(3.0), 0.0]])
    p, q, mid = (0.5, 0.5), (0.75, 0.25), (0.625, 0.375)
    expect = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, mid, strict=True))
    expect += 0.5 * sum(b * math.log(b / c) for b, c in zip(q, mid, strict=True))
    assert float(jsd(u, v)) == pytest.approx(expect, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-30, 30), min_size=3, max_size=3),
    st.lists(st.floats(-30, 30), min_size=3, max_size=3),
)
def test_jsd_zero_symmetric_bounded(a: list[float], b: list[float]) -> None:
    u, v = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert float(jsd_rows(u, u)) == pytest.approx(0.0, abs=1e-12)
    assert float(jsd_rows(u, v)) == pytest.approx(float(jsd_rows(v, u)), abs=1e-12)
    assert -1e-12 <= float(jsd_rows(u, v)) <= math.log(2) + 1e-12


def test_jsd_reaches_ln2_for_disjoint_predictions() -> None:
    u = torch.tensor([[50.0, -50.0]])
    assert float(jsd(u, -u)) == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("fusion", ["late_sum", "concat_mlp"])
def test_batched_permutations_equal_loop_over_k(fusion: str) -> None:
    model = make_model(3, fusion)
    x, y = batch(model)
    out = model(x)
    ctx = ctx_for(model, x, y)
    method = make_method(model, lam=0.3, strategy="independent", num_permutations=5)
    torch.manual_seed(0)
    donors = method.sample_donors(y, model.modalities)
    batched = method.mipd(out, ctx, donors)
    looped = torch.stack(
        [method.mipd(out, ctx, {m: d[i : i + 1] for m, d in donors.items()}) for i in range(5)]
    ).mean()
    torch.testing.assert_close(batched, looped)


# --- permutations and subsets -------------------------------------------------------------------------
def test_donor_kinds() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    uni = draw_donors(y, 50, "uniform", g)
    assert torch.equal(uni.sort(1).values, torch.arange(8).expand(50, 8))
    der = draw_donors(y, 50, "derangement", g)
    assert torch.equal(der.sort(1).values, torch.arange(8).expand(50, 8))
    assert not bool((der == torch.arange(8)).any())
    diff = draw_donors(y, 50, "different_label", g)
    assert not bool((y[diff] == y).any())
    same = draw_donors(torch.zeros(4, dtype=torch.long), 10, "different_label", g)
    assert not bool((same == torch.arange(4)).any())  # falls back to other rows


@pytest.mark.parametrize("shuffle_from", [2, 10**9])
def test_both_permutation_samplers_are_uniform(shuffle_from: int, monkeypatch) -> None:
    """NumPy's row shuffles (CPU, many elements) and the argsort of random keys: every row is a
    permutation, the 24 permutations of 4 rows are equally likely, and the draws are
    reproducible from the generator."""
    monkeypatch.setattr(mcr_game, "NUMPY_SHUFFLE_MIN_ELEMENTS", shuffle_from)
    g = torch.Generator().manual_seed(0)
    draws = uniform_permutations(4800, 4, g, torch.device("cpu"))
    again = uniform_permutations(4800, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(draws, again)
    assert not torch.equal(draws, uniform_permutations(4800, 4, g, torch.device("cpu")))
    assert torch.equal(draws.sort(1).values, torch.arange(4).expand(4800, 4))
    codes = (draws * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0]
    assert len(counts) == 24
    chi2 = float(((counts - 200.0) ** 2 / 200.0).sum())
    assert chi2 < 50.0  # 23 degrees of freedom: P(chi2 > 50) < 0.001


def test_subsets_all_and_linear() -> None:
    mods = ("a", "b", "c", "d")
    assert len(subsets(mods, "all")) == 14
    lin = subsets(mods, "linear")
    assert len(lin) == 8 and ("a",) in lin and ("b", "c", "d") in lin
    assert subsets(mods[:3], "linear") == subsets(mods[:3], "all") or set(
        subsets(mods[:3], "linear")
    ) == set(subsets(mods[:3], "all"))
    assert subsets(mods[:2], "linear") == [("a",), ("b",)]


def test_linear_subsets_skip_pairs_for_four_modalities() -> None:
    model = make_model(4, "late_sum")
    x, y = batch(model)
    out = model(x)
    ctx = ctx_for(model, x, y)
    full = make_method(model, lam=1.0, strategy="collaborative", num_permutations=2)
    lin = make_method(
        model, lam=1.0, strategy="collaborative", num_permutations=2, subsets="linear"
    )
    torch.manual_seed(0)
    donors = full.sample_donors(y, model.modalities)
    ratio = float(full.mipd(out, ctx, donors)) / float(lin.mipd(out, ctx, donors))
    assert ratio > 1.0  # 14 sets versus 8, each term negative


# --- contrastive and CEB ------------------------------------------------------------------------------
def nt_xent_loop(z: dict[str, Tensor], labels: Tensor, tau: float) -> float:
    emb = [F.normalize(v, dim=-1) for v in z.values()]
    rows = [(e[b], int(labels[b])) for e in emb for b in range(e.shape[0])]
    losses = []
    for a, (ea, la) in enumerate(rows):
        negs = [math.exp(float(ea @ en) / tau) for en, ln in rows if ln != la]
        for p, (ep, lp) in enumerate(rows):
            if p == a or lp != la:
                continue
            pos = math.exp(float(ea @ ep) / tau)
            losses.append(-math.log(pos / (pos + sum(negs))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("m", [2, 3])
def test_nt_xent_matches_loop(m: int) -> None:
    g = torch.Generator().manual_seed(0)
    z = {f"m{i}": torch.randn(6, 4, generator=g, dtype=torch.float64) for i in range(m)}
    labels = torch.tensor([0, 1, 0, 2, 1, 1])
    assert float(nt_xent(z, labels, 0.5)) == pytest.approx(nt_xent_loop(z, labels, 0.5), rel=1e-9)
    idx = torch.arange(6)  # the "pure" variant: same-sample positives only
    assert float(nt_xent(z, idx, 0.3)) == pytest.approx(nt_xent_loop(z, idx, 0.3), rel=1e-9)


@pytest.mark.parametrize("temperature", [0.5, 0.07, 0.02])
@pytest.mark.parametrize(
    "m,labels",
    [
        (2, [0, 1, 0, 2, 1, 1, 2, 0]),
        (3, [1, 1, 1, 1, 0, 1]),  # rows of label 1 have negatives, one row has no positive
        (2, [2, 2, 2, 2]),  # no negatives at all: the loss is 0
    ],
)
def test_nt_xent_value_and_gradient_match_autograd(
    m: int, labels: list[int], temperature: float
) -> None:
    """The hand-written backward (temperature >= 0.05) and the log-space autograd fallback agree
    with autograd on the plain formula, also with one-hot label equality."""
    g = torch.Generator().manual_seed(1)
    y = torch.tensor(labels)
    z = {f"m{i}": torch.randn(len(labels), 5, generator=g, dtype=torch.float64) for i in range(m)}
    for v in z.values():
        v.requires_grad_(True)
    lab = y.repeat(m)
    expected = nt_xent_autograd(
        torch.cat(list(z.values())), lab[:, None] == lab[None, :], temperature
    )
    expected_grads = torch.autograd.grad(expected, list(z.values()))
    for classes in (None, 3):
        got = nt_xent(z, y, temperature, classes)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, list(z.values())), expected_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_nt_xent_float32_stays_accurate_at_the_lowest_fast_temperature() -> None:
    """float32 at temperature 0.05 (exp(-40) is the smallest exponential): value and gradient
    within float32 rounding of the float64 log-space reference, no cancellation."""
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0, 0, 0])
    z32 = {f"m{i}": torch.randn(10, 8, generator=g).requires_grad_(True) for i in range(3)}
    z64 = {k: v.detach().double().requires_grad_(True) for k, v in z32.items()}
    lab = y.repeat(3)
    same = lab[:, None] == lab[None, :]
    got = nt_xent(z32, y, 0.05, 3)
    expected = nt_xent_autograd(torch.cat(list(z64.values())), same, 0.05)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    grads32 = torch.autograd.grad(got, list(z32.values()))
    grads64 = torch.autograd.grad(expected, list(z64.values()))
    for a, b in zip(grads32, grads64, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_contrastive_regression_positives_by_sign() -> None:
    model = make_model(2, "late_sum", c=1)
    x, _ = batch(model)
    y = torch.tensor([0.5, -1.0, 2.0, -0.1, 0.0, 1.0, -3.0, 0.2])
    method = make_method(model, lam=0.0, lam_con=1.0)
    out = model(x)
    ctx = StepContext.standalone(y, task="regression", fusion=model.fusion)
    got = float(method.contrastive_loss(out, ctx))
    assert got == pytest.approx(nt_xent_loop(out.latents, (y >= 0).long(), 0.5), rel=1e-5)


@pytest.mark.parametrize("source", ["label", "logits"])
def test_ceb_head_value_and_gradient(source: str) -> None:
    model = make_model(2, "late_sum")
    method = MCR(lam=0.0, lam_con=0.0, lam_ceb=2.0, ceb_input=source, ceb_hidden=5)
    head = method.setup(ModelInfo(model.modalities, {"m1": 6, "m2": 6}, 4))
    assert isinstance(head, nn.Module)
    x, y = batch(model)
    out = model(x)
    losses = method.losses(out, ctx_for(model, x, y))
    inp = F.one_hot(y, 4).float() if source == "label" else out.logits.detach()
    w1, w2 = head.net[0].weight, head.net[2].weight
    target = torch.cat([out.latents["m1"], out.latents["m2"]], 1)
    expect = 2.0 * ((torch.relu(inp @ w1.T) @ w2.T - target) ** 2).mean()
    torch.testing.assert_close(losses["ceb"], expect)
    g_head, g_enc = torch.autograd.grad(losses["ceb"], [w2, model.encoders["m1"][0].weight])
    assert float(g_head.abs().sum()) > 0 and float(g_enc.abs().sum()) > 0


# --- perturbation variants ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "perturbation", ["latent_noise", "latent_zero", "input_noise", "input_zero"]
)
@pytest.mark.parametrize("fusion", ["late_sum", "gated"])
def test_perturbation_variants(perturbation: str, fusion: str) -> None:
    model = make_model(2, fusion)
    x, y = batch(model)
    out = model(x)
    ctx = ctx_for(model, x, y)
    method = make_method(
        model, lam=1.0, strategy="independent", num_permutations=3, perturbation=perturbation
    )
    torch.manual_seed(0)
    reg = method.mipd(out, ctx)
    assert float(reg) < 0  # perturbing changes predictions
    if perturbation == "latent_zero":  # hand value: zero latents of m1, then of m2
        z = out.latents
        zero1 = model.fusion({"m1": torch.zeros_like(z["m1"]), "m2": z["m2"]}).logits
        zero2 = model.fusion({"m1": z["m1"], "m2": torch.zeros_like(z["m2"])}).logits
        expect = -(jsd(zero1, out.logits) + jsd(zero2, out.logits))
        torch.testing.assert_close(reg, expect)
    grads = enc_grads(model, reg, "m1")
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_regression_uses_mse() -> None:
    model = make_model(2, "late_sum", c=1)
    x, _ = batch(model)
    y = torch.randn(8)
    out = model(x)
    ctx = StepContext.standalone(y, task="regression", fusion=model.fusion)
    method = make_method(model, lam=1.0, strategy="independent", num_permutations=2)
    torch.manual_seed(0)
    donors = method.sample_donors(y, model.modalities)
    reg = method.mipd(out, ctx, donors)
    c = out.contributions
    assert c is not None
    expect = 0.0
    for m, other in (("m1", "m2"), ("m2", "m1")):
        perm = c[m][donors[m].reshape(-1)] + c[other].repeat(2, 1) + model.fusion.bias
        expect = expect - ((perm - out.logits.repeat(2, 1)) ** 2).mean()
    torch.testing.assert_close(reg, expect)


# --- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"lam": -1.0},
        {"num_permutations": 0},
        {"temperature": 0.0},
        {"strategy": "selfish"},
        {"lam_ceb": -0.1},
    ],
)
def test_bad_params_raise_config_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        resolve_config({"method": "mcr", **{f"method.{k}": v for k, v in bad.items()}})


def test_shipped_configs_resolve() -> None:
    files = sorted((ROOT / "mmbalance" / "configs" / "mcr").glob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        flat = load_yaml(path)
        assert flat["method"] == "mcr"
        params = {k.removeprefix("method."): v for k, v in flat.items() if k.startswith("method.")}
        METHODS.get("mcr")(**params)  # validates every method option


# --- DDP ------------------------------------------------------------------------------------------
def _mcr_step_method(model: MultimodalModel) -> MCR:
    return make_method(model, lam=1.0, strategy="independent", num_permutations=4, lam_con=1.0)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    model = make_model(2, "late_sum").double()
    method = _mcr_step_method(model)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(model, b=16, seed=10 + step)
        half = {k: v[rank * 8 : (rank + 1) * 8].double() for k, v in x.items()}
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)  # every rank draws its permutations as one process would
        output = ddp(half)
        ctx = StepContext(y[rank * 8 : (rank + 1) * 8], fusion=model.fusion)
        total_loss(method.losses(output, ctx)).backward()
        opt.step()
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: destroying DDP's reducer there can deadlock on gloo


def _single_process_run(shards: int) -> dict[str, Tensor]:
    """Three steps in one process on batches of 16, each batch split into ``shards`` blocks whose
    MCR losses (permutations and contrastive pairs within the block) are averaged."""
    model = make_model(2, "late_sum").double()
    method = _mcr_step_method(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    size = 16 // shards
    for step in range(3):
        x, y = batch(model, b=16, seed=10 + step)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for h in range(shards):
            part = {k: v[h * size : (h + 1) * size].double() for k, v in x.items()}
            torch.manual_seed(100 + step)
            ctx = StepContext(y[h * size : (h + 1) * size], fusion=model.fusion)
            total = total + total_loss(method.losses(model(part), ctx)) / shards
        total.backward()
        opt.step()
    return model.state_dict()


def test_ddp_equals_per_shard_mcr(tmp_path: Path) -> None:
    """Two processes at global batch 16 train exactly like one process that averages the MCR
    losses of the two halves (permutations and contrastive pairs within each half), not like one
    process at batch 16: the difference the module docstring states."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    per_shard = _single_process_run(shards=2)
    whole = _single_process_run(shards=1)
    differs = False
    for k, v in per_shard.items():
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], v, rtol=1e-9, atol=1e-11, msg=k)
        differs |= not torch.allclose(r0[k], whole[k], rtol=1e-6, atol=1e-8)
    assert differs


# --- training -----------------------------------------------------------------------------------------
def _run(method: str, tmp: Path, **extra: object) -> dict[str, float]:
    cfg = resolve_config(
        {
            "method": method,
            "dataset.n_train": 300,
            "dataset.n_val": 200,
            "dataset.n_test": 500,
            "dataset.n_bayes": 1000,
            "train.epochs": 3,
            "train.progress": False,
            "train.tensorboard": False,
            **extra,
        }
    )
    return fit(cfg, tmp).metrics["test"]


def test_lambda_zero_reproduces_multiloss(tmp_path: Path) -> None:
    a = _run("multiloss", tmp_path / "a", **{"method.lam_uni": 0.5})
    b = _run(
        "mcr",
        tmp_path / "b",
        **{"method.lam_uni": 0.5, "method.lam": 0.0, "method.lam_con": 0.0, "method.lam_ceb": 0.0},
    )
    assert a == b


def test_mcr_trains_with_every_term(tmp_path: Path) -> None:
    metrics = _run("mcr", tmp_path, **{"method.lam": 0.5, "method.lam_ceb": 0.1})
    assert metrics["accuracy"] > 0.5
    with (tmp_path / "steps.csv").open() as f:
        names = {row["name"] for row in csv.DictReader(f)}
    assert {"mcr_div_m1", "mcr_div_m2"} <= names


@pytest.mark.slow
def test_mcr_raises_weak_modality_probe_above_joint(competition_metrics) -> None:
    """Competition preset: MCR (lam 1) trains the weak m2 encoder better than joint training.

    Measured over train seeds 0-2 (``benchmarks/find_regime.py``), m2 probe accuracy: joint
    0.642 ± 0.004, mcr lam=1 0.686 ± 0.007 (unimodal m2 0.682, untrained 0.612); fused accuracy
    0.965 vs 0.981. Averaged over two seeds here. The gain comes from the unimodal and
    contrastive terms (multiloss alone: 0.678 ± 0.007); the MIPD game alone (lam 1, lam_uni 0,
    lam_con 0) gives 0.626 ± 0.011, below joint, and lam 5 diverges (nan) on 2 of 3 seeds.
    """
    joint = competition_metrics({"method": "joint"})
    mcr = competition_metrics({"method": "mcr", "method.lam": 1.0})
    assert mcr["probe_accuracy_m2"] >= joint["probe_accuracy_m2"] + 0.02, (mcr, joint)
    assert mcr["accuracy"] >= joint["accuracy"], (mcr, joint)
