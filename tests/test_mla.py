"""MLA: the OWM projector against its formula, orthogonality of the projected head gradient to
the stored features, per-sample entropy gates, one optimizer step per modality, learning on the
competition preset and exact resumption."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SMALL_COMPETITION, build_trainer

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import ModelInfo, StepContext, build_method
from mmbalance.methods.mla import (
    MLA,
    entropy_gates,
    owm_update,
    project_gradient,
    projector_alpha,
)
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import Trainer, fit


# --- the projector ------------------------------------------------------------------------------
def test_owm_update_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen)
    p = torch.eye(5) - 0.1 * (a @ a.T) / 25  # a symmetric projector-like start
    r = torch.randn(5, generator=gen)
    alpha = 0.1**1.25
    k = [sum(float(p[i, j]) * float(r[j]) for j in range(5)) for i in range(5)]
    denom = alpha + sum(float(r[i]) * k[i] for i in range(5))
    expected = torch.tensor(
        [[float(p[i, j]) - k[i] * k[j] / denom for j in range(5)] for i in range(5)]
    )
    torch.testing.assert_close(owm_update(p, r, alpha, normalize=False), expected)
    frob = math.sqrt(sum(float(v) ** 2 for v in expected.flatten()))
    torch.testing.assert_close(owm_update(p, r, alpha, normalize=True), expected / frob)
    g = torch.randn(3, 5, generator=gen)
    torch.testing.assert_close(project_gradient(g, expected), g @ expected.T)


def test_projector_alpha_schedule() -> None:
    assert projector_alpha(0.0) == pytest.approx(0.1)
    assert projector_alpha(0.5) == pytest.approx(0.1**1.5)
    assert projector_alpha(0.99) == pytest.approx(0.1**1.99)


@pytest.mark.parametrize("normalize", [False, True])
def test_projected_gradient_is_orthogonal_to_the_stored_features(normalize: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    d, stored = 8, 4
    p = torch.eye(d, dtype=torch.float64)
    features = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(stored)]
    for r in features:
        p = owm_update(p, r, 1e-10, normalize)
    g = project_gradient(torch.randn(6, d, generator=gen, dtype=torch.float64), p)
    for r in features:  # the weight update moves no logit of a stored feature direction
        assert float((g @ r).abs().max()) < 1e-7 * float(g.abs().max())
    # a direction orthogonal to every stored one passes (scaled, when normalised)
    basis = torch.linalg.qr(torch.stack(features, 1)).Q
    free = torch.randn(d, generator=gen, dtype=torch.float64)
    free = free - basis @ (basis.T @ free)
    assert float((p @ free).norm()) > 0.1 * float(free.norm()) / (d if normalize else 1)


def test_projector_residual_along_the_new_feature_is_alpha_over_alpha_plus_rkr() -> None:
    # Sherman-Morrison: P_new r = alpha / (alpha + r^T P r) * P r, exactly
    gen = torch.Generator().manual_seed(2)
    p = torch.eye(6, dtype=torch.float64)
    for _ in range(2):
        p = owm_update(p, torch.randn(6, generator=gen, dtype=torch.float64), 0.05, False)
    r = torch.randn(6, generator=gen, dtype=torch.float64)
    alpha = projector_alpha(0.3)
    factor = alpha / (alpha + float(r @ p @ r))
    torch.testing.assert_close(owm_update(p, r, alpha, False) @ r, factor * (p @ r))


# --- gates --------------------------------------------------------------------------------------
def _entropy(logits: list[float]) -> float:
    z = [math.exp(v) for v in logits]
    s = sum(z)
    return -sum((v / s) * math.log(v / s) for v in z)


@pytest.mark.parametrize("m", [2, 3])
def test_entropy_gates_are_per_sample_and_match_the_formula(m: int) -> None:
    # sample 0: modality 0 confident; sample 1: modality m-1 confident; sample 2: all alike
    rows = {
        0: [[4.0, 0.0, 0.0], [0.5, 0.2, 0.1], [0.3, 0.3, 0.2]],
        1: [[0.1, 0.2, 0.3], [1.0, 0.0, 0.5], [0.0, 0.0, 5.0]],
        2: [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
    }
    logits = [torch.tensor([rows[i][j if j < m - 1 else 2] for i in range(3)]) for j in range(m)]
    gates = entropy_gates(logits)
    for i in range(3):
        h = [_entropy(logits[j][i].tolist()) for j in range(m)]
        raw = [math.exp(max(h) - hj) for hj in h]
        for j in range(m):
            assert float(gates[j, i]) == pytest.approx(raw[j] / sum(raw), rel=1e-5)
    assert float(gates[0, 0]) > 0.5 and float(gates[m - 1, 1]) > 0.5  # per sample, not per batch
    torch.testing.assert_close(gates[:, 2], torch.full((m,), 1.0 / m))
    # the prediction is the gate-weighted sum of the shared head's logits
    method = MLA()
    method.setup(_info(m))
    with torch.no_grad():
        method.head.linear.weight.copy_(torch.eye(3))
        method.head.linear.bias.zero_()
    output = _output({f"m{j}": logits[j] for j in range(m)})
    expected = sum(gates[j].unsqueeze(1) * logits[j] for j in range(m))
    torch.testing.assert_close(method.predict(output), expected)
    uniform = MLA(gating="uniform")
    uniform.setup(_info(m))
    uniform.head.load_state_dict(method.head.state_dict())
    torch.testing.assert_close(uniform.predict(output), torch.stack(logits).mean(0))


def _info(m: int, dim: int = 3) -> ModelInfo:
    return ModelInfo(tuple(f"m{j}" for j in range(m)), {f"m{j}": dim for j in range(m)}, 3)


def _output(latents: dict[str, torch.Tensor]) -> Any:
    from mmbalance.models.output import ModelOutput

    return ModelOutput(logits=torch.zeros(3, 3), latents=latents)


# --- the step ------------------------------------------------------------------------------------
def test_rewrite_projects_the_shared_head_gradient_after_the_first_part() -> None:
    torch.manual_seed(0)
    model = MultimodalModel(
        {"a": MLPEncoder((5,), (8,), 4), "b": MLPEncoder((6,), (8,), 4)},
        LateSumFusion({"a": 4, "b": 4}, 3),
    )
    method = MLA()
    head = method.setup(model_info_of(model))
    inputs = {"a": torch.randn(10, 5), "b": torch.randn(10, 6)}
    ctx = StepContext.standalone(torch.randint(0, 3, (10,)), inputs=inputs, epoch_progress=0.4)
    projector = torch.eye(4)
    for step, part in enumerate(["a", "b", "a"]):
        ctx.part = part
        head.zero_grad(set_to_none=True)
        latents = method.transform_latents(method.encode(model, inputs, ctx), ctx)
        assert torch.equal(latents["b" if part == "a" else "a"], torch.zeros(10, 4))
        losses = method.losses(model.heads(latents), ctx)
        assert list(losses) == [f"uni_{part}"]
        sum(losses.values()).backward()
        raw = head.linear.weight.grad.clone()
        raw_bias = head.linear.bias.grad.clone()
        method.rewrite_gradients(ctx)
        if step == 0:  # the official guard: no update and no projection on the first part
            torch.testing.assert_close(head.linear.weight.grad, raw)
        else:
            r = model.encode(inputs)[part].detach().mean(0)
            projector = owm_update(projector, r, 0.1**1.4, normalize=True)
            torch.testing.assert_close(head.projector, projector)
            torch.testing.assert_close(head.linear.weight.grad, raw @ projector.T)
        torch.testing.assert_close(head.linear.bias.grad, raw_bias)
    assert int(head.updates) == 3


def model_info_of(model: MultimodalModel) -> ModelInfo:
    return ModelInfo(model.modalities, dict(model.fusion.latent_dims), 3)


def _trainer(tmp_path: Path, **overrides: Any) -> Trainer:
    return build_trainer(
        resolve_config({**SMALL_COMPETITION, "method": "mla", **overrides}), tmp_path
    )


def test_alternation_takes_one_optimizer_step_per_modality(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, **{"train.optimizer": "adam"})
    encoded: list[tuple[str, ...]] = []
    original = trainer.model.encode

    def spy(inputs: Any, only: Any = None) -> dict[str, torch.Tensor]:
        out = original(inputs, only)
        encoded.append(tuple(out))
        return out

    trainer.model.encode = spy  # type: ignore[method-assign]
    batch = next(iter(trainer.loaders["train"]))
    trainer.train_mode()
    terms = trainer.train_step(batch, 0)
    assert encoded == [("m1",), ("m2",)]
    assert set(terms) == {"uni_m1", "uni_m2"}
    state = trainer.optimizer.state
    assert int(state[trainer.groups["encoder.m1"][0]]["step"]) == 1
    assert int(state[trainer.groups["encoder.m2"][0]]["step"]) == 1
    assert int(state[trainer.groups["method"][0]]["step"]) == 2  # the shared head, in both
    assert trainer.groups["fusion"][0] not in state  # the model's own head is not trained


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="alpha_base"):
        build_method("mla", {"alpha_base": 1.5})
    with pytest.raises(ConfigError, match="same size"):
        MLA().setup(ModelInfo(("a", "b"), {"a": 4, "b": 5}, 3))
    with pytest.raises(ConfigError, match="classification"):
        MLA().setup(ModelInfo(("a", "b"), {"a": 4, "b": 4}, 1, task="regression"))


# --- training -------------------------------------------------------------------------------------
def test_mla_learns_the_competition_preset(tmp_path: Path) -> None:
    result = fit(resolve_config({**SMALL_COMPETITION, "method": "mla"}), tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.7  # chance is 0.2 (5 classes)
    assert "mla_alpha" in (tmp_path / "steps.csv").read_text()
