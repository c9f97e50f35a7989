"""Tests of MLB: coefficients against the formula, where and how much each gradient is scaled
(against multi-loss gradients), equality with multi-loss when the heads are perfect, and a
learning test."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LEARN as CONFTEST_LEARN
from torch import nn

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import ModelInfo, StepContext, build_method
from mmbalance.methods.mlb import confidence_scores, mlb_coefficients, mlb_ratios
from mmbalance.methods.ops.gradients import scale_grad
from mmbalance.models import build_fusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import fit

LEARN: dict[str, Any] = {**CONFTEST_LEARN, "dataset.n_test": 500, "train.epochs": 4}


# --- the formula ----------------------------------------------------------------------------------
def test_confidence_is_the_batch_mean_true_class_probability() -> None:
    u = {"a": torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]), "b": torch.zeros(2, 2)}
    y = torch.tensor([1, 0])
    # a: p = 3/4 and 1/2; b: 1/2 and 1/2
    torch.testing.assert_close(confidence_scores(u, y), torch.tensor([0.625, 0.5]))


def test_two_modality_coefficients_match_the_formula() -> None:
    s0, s1, alpha = 0.8, 0.4, 0.5
    scores = torch.tensor([s0, s1])
    r = mlb_ratios(scores)
    torch.testing.assert_close(r, torch.tensor([s1 / s0, s0 / s1]))
    k = mlb_coefficients(r, alpha)
    expected = [1 + math.tanh(alpha * (s1 / s0 - 1)), 1 + math.tanh(alpha * (s0 / s1 - 1))]
    torch.testing.assert_close(k, torch.tensor(expected))
    assert k[0] < 1 < k[1]  # the strong modality is slowed, the weak one accelerated


def test_beta_max_caps_the_weak_modality_only() -> None:
    scores = torch.tensor([0.8, 0.4])
    r = mlb_ratios(scores)
    for beta in (10.0, 1.0, 0.5):
        k = mlb_coefficients(r, 2.0, beta)
        weak = 1 + (beta - 1) * math.tanh(2.0 * (2.0 - 1))
        strong = 1 + math.tanh(2.0 * (0.5 - 1))
        torch.testing.assert_close(k, torch.tensor([strong, weak]))
    assert float(mlb_coefficients(r, 2.0, 1.0)[1]) == 1.0  # beta_max 1: no acceleration


def test_three_modality_ratio_is_against_the_mean_of_the_others() -> None:
    s = [0.9, 0.3, 0.6]
    r = mlb_ratios(torch.tensor(s))
    expected_r = [
        ((s[1] + s[2]) / 2) / s[0],
        ((s[0] + s[2]) / 2) / s[1],
        ((s[0] + s[1]) / 2) / s[2],
    ]
    torch.testing.assert_close(r, torch.tensor(expected_r))
    k = mlb_coefficients(r, 1.5, 4.0)
    expected_k = [
        1 + (4.0 - 1) * math.tanh(1.5 * (x - 1)) if x > 1 else 1 + math.tanh(1.5 * (x - 1))
        for x in expected_r
    ]
    torch.testing.assert_close(k, torch.tensor(expected_k))


def test_scale_grad_is_the_identity_forward_and_scales_backward() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = scale_grad(x, torch.tensor(0.25))
    assert torch.equal(y, x)
    (y * torch.arange(12.0).view(4, 3)).sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * torch.arange(12.0).view(4, 3))


def test_bad_options_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        build_method("mlb", {"alpha": -1})
    with pytest.raises(ConfigError, match="beta_max"):
        build_method("mlb", {"beta_max": -0.5})
    with pytest.raises(ConfigError, match="classification"):
        build_method("mlb", {}).setup(ModelInfo(("a", "b"), {"a": 2, "b": 2}, 1, "regression"))


# --- where the coefficients act --------------------------------------------------------------------
def _model(fusion: str, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)) for m in ("a", "b")}
    for enc in encoders.values():
        enc.out_dim = 4  # type: ignore[attr-defined]
    return MultimodalModel(encoders, build_fusion(fusion, {"a": 4, "b": 4}, 3, {}), True)


def _batch(seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (16,), generator=gen)
    inputs = {m: torch.randn(16, 5, generator=gen) for m in ("a", "b")}
    return inputs, y


def _grads(model: MultimodalModel, method, inputs, y) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    ctx = StepContext.standalone(y, fusion=model.fusion, encoder_params=model.encoder_parameters())
    latents = method.encode(model, inputs, ctx)
    output = model.heads(method.transform_latents(latents, ctx))
    method.backward(method.losses(output, ctx), ctx)
    method.rewrite_gradients(ctx)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, dict(ctx.logs)


def _owner(name: str) -> str | None:
    """The modality a parameter belongs to for MLB's scaling, or None (shared)."""
    for prefix in ("encoders.", "unimodal_heads.", "fusion.linears.", "fusion.weights."):
        if name.startswith(prefix):
            return name[len(prefix)]
    return None


@pytest.mark.parametrize("fusion", ["late_sum", "cosine", "concat_linear", "concat_mlp"])
def test_each_modality_gradient_is_k_times_the_multiloss_gradient(fusion: str) -> None:
    model = _model(fusion)
    inputs, y = _batch()
    with torch.no_grad():  # make b the weak modality: its unimodal head is near uniform
        model.unimodal_heads["b"].weight.mul_(0.01)
    reference, _ = _grads(model, build_method("multiloss", {"lam_uni": 0.7}), inputs, y)
    grads, logs = _grads(model, build_method("mlb", {"alpha": 2.0, "lam_uni": 0.7}), inputs, y)
    k = {m: logs[f"coeff_{m}"] for m in ("a", "b")}
    assert abs(k["a"] - 1) > 0.01 and abs(k["b"] - 1) > 0.01
    assert set(grads) == set(reference)
    for name, g in grads.items():
        owner = _owner(name)
        if fusion == "concat_linear" and name == "fusion.linear.weight":
            expected = reference[name].clone()  # columns 0-3 act on a, 4-7 on b
            expected[:, :4] *= k["a"]
            expected[:, 4:] *= k["b"]
        else:
            expected = reference[name] * (k[owner] if owner else 1.0)
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7, msg=name)


def _perfect_heads(model: MultimodalModel, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Set both encoders and unimodal heads so that each head puts probability 1 (in float32) on
    the label, and return the inputs (the one-hot label)."""
    with torch.no_grad():
        for m in ("a", "b"):
            enc = model.encoders[m]
            enc[0].weight.copy_(torch.eye(6, 5) * 3.0)  # tanh(3) ~ 1 at the label
            enc[0].bias.zero_()
            enc[2].weight.copy_(torch.eye(4, 6) * 20.0)
            enc[2].bias.zero_()
            model.unimodal_heads[m].weight.copy_(torch.eye(3, 4) * 50.0)  # logit ~ 1000
            model.unimodal_heads[m].bias.zero_()
    onehot = torch.cat([torch.nn.functional.one_hot(y, 3).float(), torch.zeros(len(y), 2)], 1)
    return {"a": onehot, "b": onehot.clone()}


@pytest.mark.parametrize("fusion", ["late_sum", "concat_mlp"])
def test_perfect_heads_give_k_one_and_the_multiloss_step(fusion: str) -> None:
    """Both unimodal heads certain of the label: s = 1, r = 1, k = 1 and every gradient equals
    multiloss's exactly (additive heads: no extra pass; others: one head re-run)."""
    _, y = _batch()
    grads = {}
    for name in ("multiloss", "mlb"):
        model = _model(fusion)
        inputs = _perfect_heads(model, y)
        grads[name], logs = _grads(model, build_method(name, {"lam_uni": 1.0}), inputs, y)
        if name == "mlb":
            assert logs["score_a"] == logs["score_b"] == 1.0
            assert logs["ratio_a"] == logs["ratio_b"] == 1.0
            assert logs["coeff_a"] == logs["coeff_b"] == 1.0
    assert set(grads["mlb"]) == set(grads["multiloss"])
    for n, g in grads["mlb"].items():
        assert torch.equal(g, grads["multiloss"][n]), n
    assert any(g.abs().sum() > 0 for g in grads["mlb"].values())


# --- learning ---------------------------------------------------------------------------------------
def test_mlb_learns_the_competition_preset(tmp_path: Path) -> None:
    cfg = resolve_config({**LEARN, "method": "mlb", "method.alpha": 2.0})
    result = fit(cfg, tmp_path / "mlb")
    assert result.metrics["test"]["accuracy"] >= 0.8  # chance is 0.2 (5 classes)
