"""InfoReg: the prime-window detector on hand-made traces, both official rules (ea7b9d5: scores
and unimodal losses from the fused head's slices plus b/M, beta0 by position, threshold 0.05;
41d887f: unimodal heads, one beta0, threshold 0.04), the proximal gradient against its formula
for whichever modality leads (M = 2 and 3), the Fisher trace, learning on the competition preset
and exact resumption."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_COMPETITION

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, StepContext, build_method, total_loss
from mmbalance.methods.inforeg import (
    InfoReg,
    leader_and_gap,
    proximal_coefficient,
    window_k,
)
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit


# --- the window detector ---------------------------------------------------------------------
def test_window_detector_on_a_hand_made_trace_sequence() -> None:
    traces = [2.0, 4.0, 4.0, 4.0, 4.0, 1.0]
    # window 3, missing epochs count as 0: bar = sum(last 3) / 3
    expected = [
        1.0,  # no trace yet
        (2 / 3 - 0) / (2 / 3),
        (6 / 3 - 2 / 3) / (6 / 3),
        (10 / 3 - 6 / 3) / (10 / 3),
        (12 / 3 - 10 / 3) / (12 / 3),
        (12 / 3 - 12 / 3) / (12 / 3),
        (9 / 3 - 12 / 3) / (9 / 3),
    ]
    ks = [window_k(traces[:n], 3) for n in range(len(traces) + 1)]
    for k, e in zip(ks, expected, strict=True):
        assert k == pytest.approx(e)
    assert [k > 0.04 for k in ks] == [True, True, True, True, True, False, False]
    assert window_k([0.0, 0.0], 3) == 0.0
    # the official ten-epoch window: eleven equal traces end the window
    assert window_k([1.0] * 10, 10) == pytest.approx(0.1)
    assert window_k([1.0] * 11, 10) == 0.0


def test_leader_gap_and_coefficient() -> None:
    assert leader_and_gap(torch.tensor([3.0, 5.0, 4.5])) == (1, pytest.approx(0.5))
    assert leader_and_gap(torch.tensor([2.0, 2.0])) is None
    assert proximal_coefficient(0.7, 0.95) == pytest.approx(0.95 * math.exp(math.tanh(0.7)))
    assert proximal_coefficient(50.0, 0.95) == pytest.approx(0.95 * math.e)


# --- the proximal term --------------------------------------------------------------------------
def _model(m: int, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    dims = {f"m{j}": 4 for j in range(m)}
    encoders = {f"m{j}": MLPEncoder((3 + j,), (6,), 4) for j in range(m)}
    return MultimodalModel(encoders, LateSumFusion(dims, 3), unimodal_heads=True)


def _inputs(m: int, n: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {f"m{j}": torch.randn(n, 3 + j, generator=gen) for j in range(m)}


def _lead(model: MultimodalModel, leader: str) -> None:
    """Every target is class 0; the leader's unimodal head says class 0 loudly, the others say
    nothing (small weights, no bias), so the leader has the largest score."""
    with torch.no_grad():
        for m, head in model.unimodal_heads.items():
            head.weight.mul_(0.01)
            head.bias.copy_(torch.tensor([4.0, 0.0, 0.0]) if m == leader else torch.zeros(3))


def _step(method: InfoReg, model: MultimodalModel, inputs: dict[str, torch.Tensor]) -> Any:
    targets = torch.zeros(8, dtype=torch.long)
    ctx = StepContext.standalone(targets, encoder_params=model.encoder_parameters())
    model.zero_grad(set_to_none=True)
    output = model(inputs)
    total_loss(method.losses(output, ctx)).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    method.rewrite_gradients(ctx)
    return output, raw, ctx


@pytest.mark.parametrize(("m", "leader"), [(2, "m0"), (2, "m1"), (3, "m0"), (3, "m1"), (3, "m2")])
def test_each_modality_can_be_the_regulated_one(m: int, leader: str) -> None:
    model = _model(m)
    _lead(model, leader)
    method = InfoReg(rule="41d887f")
    method.setup(ModelInfo(model.modalities, dict(model.fusion.latent_dims), 3))
    method.on_epoch_start(EpochContext.standalone(0, encoder_params=model.encoder_parameters()))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # the encoders moved during the epoch
        for p in model.encoders.parameters():
            p.add_(0.1 * torch.randn_like(p))
    output, raw, ctx = _step(method, model, _inputs(m))
    scores = [
        float(output.unimodal_logits[k].detach().softmax(-1)[:, 0].sum()) for k in model.modalities
    ]
    ordered = sorted(scores, reverse=True)
    assert scores[int(leader[1])] == ordered[0]
    beta = 0.95 * math.exp(math.tanh(ordered[0] - ordered[1]))
    assert ctx.logs[f"beta_{leader}"] == pytest.approx(beta)
    for name, p in model.named_parameters():
        if name.startswith(f"encoders.{leader}."):
            torch.testing.assert_close(p.grad, raw[name] + beta * (p.detach() - start[name]))
        else:
            torch.testing.assert_close(p.grad, raw[name])  # nobody else is touched


def test_a_closed_window_of_the_leader_means_no_regulation() -> None:
    model = _model(2)
    _lead(model, "m1")
    method = InfoReg(rule="41d887f", window=3)
    method.setup(ModelInfo(model.modalities, dict(model.fusion.latent_dims), 3))
    method.traces = {"m0": [1.0, 2.0, 4.0], "m1": [1.0, 1.0, 1.0, 1.0]}  # k: m0 open, m1 0
    method.on_epoch_start(EpochContext.standalone(0, encoder_params=model.encoder_parameters()))
    assert method.k["m1"] == 0.0 and method.k["m0"] > 0.04
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.1)
    _, raw, ctx = _step(method, model, _inputs(2))
    assert ctx.logs["beta_m1"] == 0.0 and ctx.logs["beta_m0"] == 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, raw[name])


def test_fisher_trace_is_the_summed_mean_of_squared_final_gradients() -> None:
    model = _model(2)
    _lead(model, "m0")
    method = InfoReg(rule="41d887f")
    method.setup(ModelInfo(model.modalities, dict(model.fusion.latent_dims), 3))
    ectx = EpochContext.standalone(0, encoder_params=model.encoder_parameters())
    method.on_epoch_start(ectx)
    sums: dict[str, torch.Tensor] = {}
    for _ in range(2):
        with torch.no_grad():
            for p in model.encoders.parameters():
                p.add_(0.05)
        _step(method, model, _inputs(2))
        for name, p in model.encoders.named_parameters():
            if p.dim() >= 2:  # the linear weights, not the biases
                sums[name] = sums.get(name, 0) + p.grad**2
    method.on_epoch_end(ectx)
    for m in ("m0", "m1"):
        expected = sum(float(v.mean()) for k, v in sums.items() if k.startswith(f"{m}."))
        assert method.traces[m] == [pytest.approx(expected, rel=1e-5)]
        assert ectx.logs[f"fisher_trace_{m}"] == pytest.approx(expected, rel=1e-5)


# --- the two official rules ----------------------------------------------------------------------
def _slices_output(contributions: dict[str, torch.Tensor], bias: torch.Tensor) -> ModelOutput:
    logits = torch.stack(list(contributions.values())).sum(0) + bias
    return ModelOutput(logits, {m: torch.zeros(4, 2) for m in contributions}, {}, contributions)


@pytest.mark.parametrize("leader", ["m0", "m1", "m2"])
def test_the_current_rule_scores_the_fused_heads_slices_with_beta_by_position(leader: str) -> None:
    names = ("m0", "m1", "m2")
    gen = torch.Generator().manual_seed(4)
    contributions = {m: 0.1 * torch.randn(4, 3, generator=gen) for m in names}
    contributions[leader] = contributions[leader] + torch.tensor([3.0, 0.0, 0.0])  # says class 0
    bias = torch.tensor([0.3, -0.6, 0.9])
    output = _slices_output(contributions, bias)
    y = torch.zeros(4, dtype=torch.long)
    method = InfoReg()  # rule ea7b9d5
    assert not method.needs_unimodal_heads
    method.setup(ModelInfo(names, {m: 2 for m in names}, 3, additive_fusion=True))
    method.k = {m: 0.06 for m in names}  # open windows at the threshold 0.05
    ctx = StepContext.standalone(y)
    terms = method.losses(output, ctx)
    slices = {m: c + bias / 3 for m, c in contributions.items()}
    for m in names:
        torch.testing.assert_close(terms[f"uni_{m}"], F.cross_entropy(slices[m], y))
    scores = sorted((float(slices[m].softmax(-1)[:, 0].sum()), m) for m in names)
    assert scores[-1][1] == leader
    beta0 = 0.95 if leader == "m0" else 0.1  # the official audio (first) and visual coefficients
    expected = beta0 * math.exp(math.tanh(scores[-1][0] - scores[-2][0]))
    assert ctx.logs[f"beta_{leader}"] == pytest.approx(expected, rel=1e-5)


def test_the_rules_thresholds_and_heads() -> None:
    names = ("a", "v")
    contributions = {"a": torch.tensor([[2.0, 0.0, 0.0]] * 4), "v": torch.zeros(4, 3)}
    output = _slices_output(contributions, torch.zeros(3))
    output.unimodal_logits = dict(contributions)
    y = torch.zeros(4, dtype=torch.long)
    for rule, regulated in (("ea7b9d5", False), ("41d887f", True)):
        method = InfoReg(rule=rule)
        method.setup(ModelInfo(names, {"a": 2, "v": 2}, 3, additive_fusion=True))
        method.k = {"a": 0.045, "v": 0.045}  # between the old threshold 0.04 and the new 0.05
        ctx = StepContext.standalone(y)
        method.losses(output, ctx)
        assert (ctx.logs["beta_a"] > 0) == regulated, rule
    assert InfoReg(rule="41d887f").needs_unimodal_heads
    with pytest.raises(ConfigError, match="slices"):
        InfoReg().setup(ModelInfo(names, {"a": 2, "v": 2}, 3, additive_fusion=False))
    with pytest.raises(ConfigError, match="unimodal_heads"):
        InfoReg(rule="41d887f").losses(
            _slices_output(contributions, torch.zeros(3)), StepContext.standalone(y)
        )


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="window"):
        build_method("inforeg", {"window": 0})
    with pytest.raises(ConfigError, match="beta"):
        build_method("inforeg", {"beta": -1})
    with pytest.raises(ConfigError, match="classification"):
        InfoReg().setup(ModelInfo(("a", "b"), {"a": 4, "b": 4}, 1, task="regression"))


# --- training -----------------------------------------------------------------------------------
def test_inforeg_learns_the_competition_preset(tmp_path: Path) -> None:
    result = fit(resolve_config({**SMALL_COMPETITION, "method": "inforeg"}), tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.7  # chance is 0.2 (5 classes)
    k_column = [row["method_window_k_m1"] for row in result.history]
    assert k_column[0] == 1.0 and all(row["method_fisher_trace_m2"] > 0 for row in result.history)
