"""MBSD: the pairwise self-distillation against a per-sample loop written from the formula, its
gradient routing (teacher and weight constant), the modalities' own logits, and learning."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPETITION_400

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import StepContext, build_method
from mmbalance.methods.mbsd import pair_terms, self_distillation
from mmbalance.methods.ops.modality_logits import modality_logits
from mmbalance.models.fusion import ConcatMLPFusion, LateSumFusion
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit

# B = 5 samples, C = 3 classes; sample 3 is predicted wrongly by every modality (weight 0)
Z = {
    "a": torch.tensor(
        [[2.0, 0.1, -1.0], [0.3, 1.5, 0.0], [0.0, 0.2, 0.1], [3.0, 0.0, 0.0], [-0.5, 0.5, 2.5]]
    ),
    "b": torch.tensor(
        [[0.5, 0.4, 0.0], [1.0, 0.2, 0.1], [0.1, -0.3, 1.9], [2.0, 0.5, 0.0], [0.0, 0.0, 0.3]]
    ),
    "c": torch.tensor(
        [[-1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.6], [1.0, 1.2, 0.0], [0.2, 1.0, 0.1]]
    ),
}
Y = torch.tensor([0, 1, 2, 2, 2])


def expected_pair(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor) -> float:
    """``(1/B) sum_i w_i (KL_i + RS_i)`` sample by sample, from the definitions."""
    total = 0.0
    for i in range(len(y)):
        pa, pb = za[i].softmax(-1).tolist(), zb[i].softmax(-1).tolist()
        qa, qb = pa[y[i]], pb[y[i]]
        right = int(za[i].argmax()) == int(y[i]) or int(zb[i].argmax()) == int(y[i])
        w = abs(qa - qb) if right else 0.0
        strong, weak = max(qa, qb), min(qa, qb)
        kl = strong * (math.log(strong) - math.log(weak))
        rs = sum((float(u) - float(v)) ** 2 for u, v in zip(za[i], zb[i], strict=True)) / 3
        total += w * (kl + rs)
    return total / len(y)


@pytest.mark.parametrize("modalities", [("a", "b"), ("a", "b", "c")])
def test_self_distillation_equals_the_formula(modalities: tuple[str, ...]) -> None:
    logits = {m: Z[m] for m in modalities}
    pairs = list(itertools.combinations(modalities, 2))
    expected = sum(expected_pair(Z[a], Z[b], Y) for a, b in pairs) / len(pairs)
    assert float(self_distillation(logits, Y)) == pytest.approx(expected, rel=1e-5)
    w, _, _ = pair_terms(Z["a"], Z["b"], Y)
    assert float(w[3]) == 0.0 and float(w[0]) > 0  # sample 3: neither modality is right


def test_teacher_and_weight_are_constants() -> None:
    za = Z["a"].clone().requires_grad_(True)
    zb = Z["b"].clone().requires_grad_(True)
    w, kl, rs = pair_terms(za, zb, Y)
    assert not w.requires_grad
    (kl * w).sum().backward()
    qa = za.softmax(-1).gather(1, Y[:, None]).squeeze(1)
    qb = zb.softmax(-1).gather(1, Y[:, None]).squeeze(1)
    a_leads = qa >= qb
    for i in range(len(Y)):
        strong, weak = (za, zb) if a_leads[i] else (zb, za)
        assert torch.count_nonzero(strong.grad[i]) == 0  # the teacher gets no gradient
        if float(w[i]) > 0:
            assert torch.count_nonzero(weak.grad[i]) > 0
    # the RS term trains both modalities
    za.grad = zb.grad = None
    rs.sum().backward()
    torch.testing.assert_close(za.grad, -zb.grad)


def test_additive_heads_use_contribution_plus_bias_share() -> None:
    torch.manual_seed(0)
    head = LateSumFusion({"a": 4, "b": 3, "c": 2}, 3)
    with torch.no_grad():
        head.shared_bias.copy_(torch.tensor([0.3, -0.6, 0.9]))
    latents = {"a": torch.randn(5, 4), "b": torch.randn(5, 3), "c": torch.randn(5, 2)}
    fused = head(latents)
    output = ModelOutput(fused.logits, latents, {}, fused.contributions)
    logits = modality_logits(output, head)
    for m in latents:
        expected = latents[m] @ head.linears[m].weight.T + head.shared_bias / 3
        torch.testing.assert_close(logits[m], expected)
    torch.testing.assert_close(sum(logits.values()), fused.logits)
    # without the head object the bias share comes from the fused logits
    for m, z in modality_logits(output, None).items():
        torch.testing.assert_close(z, logits[m])


def test_losses_add_fused_unimodal_and_distillation_terms() -> None:
    torch.manual_seed(1)
    head = LateSumFusion({"a": 4, "b": 3}, 3)
    latents = {"a": torch.randn(5, 4), "b": torch.randn(5, 3)}
    fused = head(latents)
    output = ModelOutput(fused.logits, latents, {}, fused.contributions)
    terms = build_method("mbsd", {}).losses(output, StepContext.standalone(Y, fusion=head))
    own = modality_logits(output, head)
    torch.testing.assert_close(terms["task"], F.cross_entropy(fused.logits, Y))
    for m in ("a", "b"):
        torch.testing.assert_close(terms[f"uni_{m}"], F.cross_entropy(own[m], Y))
    torch.testing.assert_close(terms["distill"], self_distillation(own, Y))


def test_non_additive_heads_use_the_unimodal_heads_or_refuse() -> None:
    head = ConcatMLPFusion({"a": 4, "b": 3}, 3)
    latents = {"a": torch.randn(5, 4), "b": torch.randn(5, 3)}
    logits = head(latents).logits
    uni = {"a": Z["a"], "b": Z["b"]}
    assert modality_logits(ModelOutput(logits, latents, uni, None), head) == uni
    with pytest.raises(ConfigError, match="unimodal_heads=true"):
        modality_logits(ModelOutput(logits, latents, {}, None), head)


def test_mbsd_learns_the_competition_task(tmp_path: Path) -> None:
    cfg = resolve_config(
        {
            **COMPETITION_400,
            "method": "mbsd",
            "train.epochs": 6,
        }
    )
    result = fit(cfg, tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    assert result.history[-1]["train_distill"] > 0


def test_regression_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="classification"):
        fit(
            resolve_config(
                {"dataset": "synthetic", "dataset.task": "regression", "method": "mbsd"}
            ),
            tmp_path / "run",
        )
