"""Tests of AGM: Shapley responses, coefficients and running target against the formulas, the
gradient routing against autograd on separated losses and against the official hook mechanism,
the passes each variant makes, clipping, resume, and a learning test."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARN
from torch import nn

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import ModelInfo, StepContext, build_method
from mmbalance.methods.agm import (
    AGM,
    agm_coefficients,
    agm_ratios,
    response_scores,
    route,
    shapley_responses,
)
from mmbalance.models import build_fusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import fit


# --- Shapley responses ------------------------------------------------------------------------------
def test_two_modality_responses_are_the_official_formula() -> None:
    torch.manual_seed(0)
    t, p_a, p_v = torch.randn(3, 5, 4).unbind(0)  # T, f(0, x_v), f(x_a, 0)
    # bit 0 = audio, bit 1 = visual: v({a}) = f(x_a, 0) = P_v, v({v}) = P_a
    o_a, o_v = shapley_responses({3: t, 1: p_v, 2: p_a}, 2)
    torch.testing.assert_close(o_a, 0.5 * (t - p_a + p_v))
    torch.testing.assert_close(o_v, 0.5 * (t - p_v + p_a))
    torch.testing.assert_close(o_a + o_v, t)


def test_three_modality_responses_are_shapley_values_with_empty_coalition_zero() -> None:
    torch.manual_seed(1)
    values = {s: torch.randn(4, 3) for s in range(1, 8)}
    responses = shapley_responses(values, 3)

    def v(s: int) -> torch.Tensor:
        return values[s] if s else torch.zeros(4, 3)

    for i in range(3):  # average marginal contribution over the 6 orderings
        total = torch.zeros(4, 3)
        for order in itertools.permutations(range(3)):
            before = 0
            for player in order:
                if player == i:
                    total += v(before | 1 << i) - v(before)
                    break
                before |= 1 << player
        torch.testing.assert_close(responses[i], total / 6)
    torch.testing.assert_close(sum(responses), values[7])  # efficiency with v({}) = 0


# --- coefficients ------------------------------------------------------------------------------------
def test_scores_floor_the_probability_at_1e_minus_8() -> None:
    o = [torch.tensor([[0.0, 0.0], [0.0, -100.0]]), torch.tensor([[0.0, math.log(3.0)]] * 2)]
    y = torch.tensor([0, 1])
    s = response_scores(o, y)
    expected_a = (math.log(2.0) + -math.log(1e-8)) / 2  # p(y)=1/2, then p ~ e^-100 < 1e-8
    expected_v = (-math.log(0.25) - math.log(0.75)) / 2
    torch.testing.assert_close(s, torch.tensor([expected_a, expected_v]))


def test_two_modality_coefficients_follow_the_official_code() -> None:
    s_a, s_v, hat_a, hat_v, alpha = 0.4, 1.1, 0.9, 0.7, 1.5
    r = agm_ratios(torch.tensor([s_a, s_v], dtype=torch.float64))
    eta = agm_ratios(torch.tensor([hat_a, hat_v], dtype=torch.float64))
    torch.testing.assert_close(r, torch.tensor([math.exp(s_v - s_a), math.exp(s_a - s_v)]).double())
    k = agm_coefficients(r, eta, alpha, cap=10.0)
    ka = math.exp(alpha * min(math.exp(hat_v - hat_a) - math.exp(s_v - s_a), 10))
    kv = math.exp(alpha * min(math.exp(hat_a - hat_v) - math.exp(s_a - s_v), 10))
    torch.testing.assert_close(k, torch.tensor([ka, kv]).double())
    assert k[0] < 1 < k[1]  # audio is ahead of its history: slowed
    # the cap bounds eta - r from above only
    big = agm_coefficients(torch.tensor([0.0]), torch.tensor([50.0]), 0.5, cap=10.0)
    torch.testing.assert_close(big, torch.tensor([math.exp(5.0)]))
    uncapped = agm_coefficients(torch.tensor([0.0]), torch.tensor([50.0]), 0.5, cap=None)
    torch.testing.assert_close(uncapped, torch.tensor([math.exp(25.0)]))
    # the flipped (BalanceBenchmark) sign inverts the ratios
    flipped = agm_ratios(torch.tensor([s_a, s_v], dtype=torch.float64), "flipped")
    torch.testing.assert_close(flipped, 1 / r)


def test_three_modality_ratio_uses_m_over_m_minus_one() -> None:
    s = [0.3, 0.9, 1.5]
    mean = sum(s) / 3
    expected = [math.exp(1.5 * (mean - x)) for x in s]
    torch.testing.assert_close(
        agm_ratios(torch.tensor(s, dtype=torch.float64)), torch.tensor(expected).double()
    )


def test_bad_options_raise_config_errors() -> None:
    for bad in ({"alpha": -1}, {"cap": 0}, {"clip_norm": 0}, {"start": 4, "end": 2}):
        with pytest.raises(ConfigError):
            build_method("agm", bad)
    with pytest.raises(ConfigError, match="mask"):
        build_method("agm", {"mask": "noise"})
    with pytest.raises(ConfigError, match="classification"):
        build_method("agm", {}).setup(ModelInfo(("a", "b"), {"a": 2, "b": 2}, 1, "regression"))


# --- gradient routing ---------------------------------------------------------------------------------
def test_routing_gives_each_pass_the_official_share_of_the_gradient() -> None:
    torch.manual_seed(2)
    t, p_a, p_v = (torch.randn(6, 3, requires_grad=True) for _ in range(3))
    y = torch.randint(0, 3, (6,))
    kappa = torch.tensor([0.3, 2.0])
    responses = shapley_responses({3: t, 1: p_v, 2: p_a}, 2)
    out = route(responses, kappa)
    torch.testing.assert_close(out, t)  # (T - P_a + P_v)/2 + (T - P_v + P_a)/2
    F.cross_entropy(out, y).backward()
    g = torch.func.grad(lambda o: F.cross_entropy(o, y))(t.detach())
    ka, kv = 0.3, 2.0
    torch.testing.assert_close(t.grad, 0.5 * (ka + kv) * g)
    torch.testing.assert_close(p_v.grad, 0.5 * (ka - kv) * g)
    torch.testing.assert_close(p_a.grad, 0.5 * (kv - ka) * g)


class _Encoder(nn.Sequential):
    """A small encoder with BatchNorm, so train and eval mode differ as in ResNets."""

    out_dim = 4

    def __init__(self) -> None:
        super().__init__(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4))


def _model(fusion: str = "concat_linear", m: int = 2, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    names = "avt"[:m]
    model = MultimodalModel(
        {n: _Encoder() for n in names}, build_fusion(fusion, {n: 4 for n in names}, 3, {})
    )
    with torch.no_grad():  # non-trivial running statistics for eval mode
        for enc in model.encoders.values():
            enc[1].running_mean.uniform_(-0.5, 0.5)
            enc[1].running_var.uniform_(0.5, 2.0)
    return model


def _batch(m: int = 2, n: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    y = torch.randint(0, 3, (n,), generator=gen)
    inputs = {name: torch.randn(n, 5, generator=gen) + 0.5 for name in "avt"[:m]}
    inputs["a"] = inputs["a"] + y.unsqueeze(1).float()  # audio carries the label: it dominates
    return inputs, y


def _agm_step(model: MultimodalModel, method: AGM, inputs, y, epoch: int = 0, step: int = 0):
    model.zero_grad(set_to_none=True)
    ctx = StepContext.standalone(
        y,
        fusion=model.fusion,
        encoder_params=model.encoder_parameters(),
        epoch=epoch,
        step=step,
    )
    latents = method.encode(model, inputs, ctx)
    output = model.heads(method.transform_latents(latents, ctx))
    losses = method.losses(output, ctx)
    method.backward(losses, ctx)
    method.rewrite_gradients(ctx)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {k: float(v) for k, v in ctx.logs.items()}, losses


class _Scale(nn.Module):
    """The official ``Modality_out``: an identity whose full backward hook scales the gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.kappa = 1.0
        self.register_full_backward_hook(lambda mod, gin, gout: (gin[0] * self.kappa,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _official_step(model: MultimodalModel, inputs, y, alpha: float, cap: float) -> tuple:
    """The official GradMod + CREMAD_main step, rewritten here independently: a train-mode pass,
    then eval-mode passes with zeroed *inputs* (autograd on), responses, coefficients from
    ``s_hat = 0``, identity modules with backward hooks, CE on their sum."""
    model.zero_grad(set_to_none=True)
    total = model(inputs).logits
    model.eval()
    pad_visual = model({"a": inputs["a"], "v": torch.zeros_like(inputs["v"])}).logits
    pad_audio = model({"a": torch.zeros_like(inputs["a"]), "v": inputs["v"]}).logits
    model.train()
    out_a = 0.5 * (total - pad_audio + pad_visual)
    out_v = 0.5 * (total - pad_visual + pad_audio)

    def score(o: torch.Tensor) -> float:
        p = o.softmax(1)[torch.arange(len(y)), y].clamp_min(1e-8)
        return float(-p.log().mean())

    s_a, s_v = score(out_a.detach()), score(out_v.detach())
    k_a = math.exp(alpha * min(1.0 - math.exp(s_v - s_a), cap))  # eta = exp(0 - 0) = 1
    k_v = math.exp(alpha * min(1.0 - math.exp(s_a - s_v), cap))
    h_a, h_v = _Scale(), _Scale()
    h_a.kappa, h_v.kappa = k_a, k_v
    F.cross_entropy(h_a(out_a) + h_v(out_v), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, (k_a, k_v), (s_a, s_v)


def test_input_variant_reproduces_the_official_hooks_and_zero_padding() -> None:
    """Same coefficients and the same gradient of every parameter as the official mechanism
    (eval-mode re-encoding of zeroed inputs, backward hooks), and the same BN statistics."""
    inputs, y = _batch()
    official_model, model = _model(), _model()
    ref_grads, (k_a, k_v), (s_a, s_v) = _official_step(official_model, inputs, y, 1.5, 10.0)
    method = build_method("agm", {"alpha": 1.5, "clip_threshold": None})
    grads, logs, _ = _agm_step(model, method, inputs, y)
    assert logs["score_a"] == pytest.approx(s_a, rel=1e-5)
    assert logs["score_v"] == pytest.approx(s_v, rel=1e-5)
    assert logs["coeff_a"] == pytest.approx(k_a, rel=1e-5)
    assert logs["coeff_v"] == pytest.approx(k_v, rel=1e-5)
    assert abs(k_a - k_v) > 0.1  # the routing matters
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, buf in model.named_buffers():  # the masked passes left BN statistics alone
        torch.testing.assert_close(buf, dict(official_model.named_buffers())[name], msg=name)


@pytest.mark.parametrize(
    ("space", "mask", "m"),
    [
        ("latent", "zero", 2),
        ("latent", "permute", 2),
        ("latent", "zero", 3),
        ("input", "permute", 3),
    ],
)
def test_routed_gradients_equal_autograd_on_separated_losses(space: str, mask: str, m: int) -> None:
    """grad = sum_m kappa_m * grad CE(o_m + stopgrad(sum of the other responses)), with the
    responses and coalition values computed here from their definitions."""
    inputs, y = _batch(m)
    model = _model("concat_mlp", m)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    method = build_method(
        "agm", {"alpha": 10.0, "space": space, "mask": mask, "clip_threshold": None, "seed": 3}
    )
    grads, logs, _ = _agm_step(model, method, inputs, y, step=5)
    names = list(model.modalities)
    kappa = [logs[f"coeff_{n}"] for n in names]
    assert max(kappa) - min(kappa) > 0.05

    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3 * 1_000_003 + 5))
    expected: dict[str, torch.Tensor] = {}
    for i in range(m):
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # the BN statistics the method's step started from
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        train_latents = model.encode(inputs)
        total = model.fusion(train_latents).logits
        model.eval()
        if space == "input":
            present = model.encode(inputs)
            absent = {n: z[perm] for n, z in present.items()}
        else:
            present = train_latents
            absent = {
                n: torch.zeros_like(z) if mask == "zero" else z[perm] for n, z in present.items()
            }

        def v(s: int, total=total, present=present, absent=absent) -> torch.Tensor:
            if s == (1 << m) - 1:
                return total
            if s == 0:
                return torch.zeros_like(total)
            chosen = {n: present[n] if s >> j & 1 else absent[n] for j, n in enumerate(names)}
            return model.fusion(chosen).logits

        responses = []
        for j in range(m):  # Shapley by orderings
            acc = torch.zeros_like(total)
            for order in itertools.permutations(range(m)):
                before = 0
                for player in order:
                    if player == j:
                        acc = acc + v(before | 1 << j) - v(before)
                        break
                    before |= 1 << player
            responses.append(acc / math.factorial(m))
        model.train()
        separated = responses[i] + sum(r.detach() for k, r in enumerate(responses) if k != i)
        (kappa[i] * F.cross_entropy(separated, y)).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                expected[name] = expected.get(name, 0) + p.grad.clone()
    assert set(grads) == set(expected)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=name)


# --- passes -------------------------------------------------------------------------------------------
def _count_calls(model: MultimodalModel) -> dict[str, list[int]]:
    calls: dict[str, list[int]] = {}

    def hook(name: str):
        def record(mod: nn.Module, args: tuple, out: object) -> None:
            x = args[0] if isinstance(args[0], torch.Tensor) else next(iter(args[0].values()))
            calls.setdefault(name, []).append(x.shape[0])

        return record

    for n, enc in model.encoders.items():
        enc.register_forward_hook(hook(n))
    model.fusion.register_forward_hook(hook("fusion"))
    return calls


@pytest.mark.parametrize("m", [2, 3])
def test_each_variant_makes_the_documented_passes(m: int) -> None:
    """input: one train pass, one eval pass on the batch and one on a single zero sample per
    encoder, 2^M - 1 head passes; latent: one encoder pass each and 2^M - 1 head passes."""
    inputs, y = _batch(m)
    for space, encoder_batches in (("input", [16, 16, 1]), ("latent", [16])):
        model = _model("concat_linear", m)
        calls = _count_calls(model)
        _agm_step(model, build_method("agm", {"space": space}), inputs, y)
        for n in model.modalities:
            assert calls[n] == encoder_batches, (space, n, calls[n])
        assert calls["fusion"] == [16] * (2**m - 1), (space, calls["fusion"])


# --- running target, window and clipping ----------------------------------------------------------------
def test_running_target_is_the_equal_weight_mean_of_all_previous_scores() -> None:
    inputs, y = _batch()
    model = _model()
    method = build_method("agm", {"alpha": 0.5, "space": "latent"})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history: list[tuple[float, float]] = []
    for step in range(5):
        _, logs, _ = _agm_step(model, method, inputs, y, epoch=step // 2, step=step)
        if history:
            hat_a = sum(h[0] for h in history) / len(history)
            hat_v = sum(h[1] for h in history) / len(history)
        else:
            hat_a = hat_v = 0.0
        assert logs["target_a"] == pytest.approx(math.exp(hat_v - hat_a), rel=1e-9)
        assert logs["target_v"] == pytest.approx(math.exp(hat_a - hat_v), rel=1e-9)
        ratio = math.exp(logs["score_v"] - logs["score_a"])
        assert logs["ratio_a"] == pytest.approx(ratio, rel=1e-9)
        kappa = math.exp(0.5 * min(logs["target_a"] - ratio, 10.0))
        assert logs["coeff_a"] == pytest.approx(kappa, rel=1e-6)
        history.append((logs["score_a"], logs["score_v"]))
        opt.step()
    state = method.state_dict()
    assert state["count"] == 5
    mean = torch.tensor(history, dtype=torch.float64).mean(0)
    torch.testing.assert_close(state["history"], mean)


def test_outside_the_window_the_step_is_plain_joint_training() -> None:
    inputs, y = _batch()
    model = _model()
    grads, logs, _ = _agm_step(
        model, build_method("agm", {"start": 3, "clip_threshold": None}), inputs, y, epoch=1
    )
    assert "coeff_a" in logs  # the running scores are still tracked
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs).logits, y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_clipping_triggers_on_a_large_fusion_weight_gradient_only() -> None:
    model = _model()
    params = list(model.parameters())
    method = build_method("agm", {"clip_threshold": 1.0, "clip_norm": 1.0})
    ctx = StepContext.standalone(
        torch.zeros(2, dtype=torch.long),
        fusion=model.fusion,
        encoder_params=model.encoder_parameters(),
    )
    for largest, should_clip in ((2.0, True), (0.5, False)):
        torch.manual_seed(0)
        for p in params:
            p.grad = torch.randn_like(p) * 0.1
        model.fusion.linear.weight.grad[0, 0] = largest
        before = [p.grad.clone() for p in params]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in before])))
        method.rewrite_gradients(ctx)
        factor = min(1.0, 1.0 / (norm + 1e-6)) if should_clip else 1.0
        assert norm > 1.0
        for p, g in zip(params, before, strict=True):
            torch.testing.assert_close(p.grad, g * factor)


# --- training: resume and learning ------------------------------------------------------------------------
def test_agm_learns_the_competition_preset(tmp_path: Path) -> None:
    result = fit(resolve_config({**LEARN, "method": "agm"}), tmp_path / "agm")
    assert result.metrics["test"]["accuracy"] >= 0.8  # chance is 0.2 (5 classes)
