"""AMCo: dependence shares, the mask ratio schedule and the mask (one row broadcast over any batch
size), the loss against the formula (M = 2 and 3), unmasked prediction through the method's
output layer, the head requirement, kill-and-resume exactness, and learning."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPETITION_400

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, StepContext, build_method
from mmbalance.methods.amco import (
    AMCo,
    amco_losses,
    class_mask,
    dependence_shares,
    mask_ratio,
)
from mmbalance.methods.ops.modality_logits import modality_logits
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit


def test_dependence_shares_of_the_joint_softmax() -> None:
    za = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    zb = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    zc = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # sample 0: exp [e^2, 1 | 1, 1 | 1, e]; sample 1: [1, 1 | e, e | 1, 1]
    d0 = math.e**2 + 4 + math.e
    d1 = 4 + 2 * math.e
    expected = [
        (math.e**2 + 1) / d0 + 2 / d1,
        2 / d0 + 2 * math.e / d1,
        (1 + math.e) / d0 + 2 / d1,
    ]
    sums = dependence_shares({"a": za, "b": zb, "c": zc})
    torch.testing.assert_close(sums, torch.tensor(expected))
    two = dependence_shares({"a": za, "b": zb})
    assert float(two.sum()) == pytest.approx(2.0)  # shares of the two sum to one per sample


def test_mask_ratio_schedule() -> None:
    assert mask_ratio(0.0, 0.3) == 0.0
    assert mask_ratio(0.1, 0.3) == pytest.approx(0.5)  # sin(pi/6)
    assert mask_ratio(0.2, 0.3) == pytest.approx(math.sqrt(3) / 2)
    assert mask_ratio(0.3, 0.3) == pytest.approx(1.0)
    assert mask_ratio(7.0, 0.3) == pytest.approx(1.0)


@pytest.mark.parametrize("zeros", [0, 2, 5])
def test_class_mask_has_the_asked_number_of_zeros(zeros: int) -> None:
    mask = class_mask(5, zeros, torch.Generator().manual_seed(1))
    assert mask.shape == (5,)
    assert int((mask == 0).sum()) == zeros and int((mask == 1).sum()) == 5 - zeros


def _head_and_output(names: tuple[str, ...], n: int) -> tuple[LateSumFusion, ModelOutput]:
    torch.manual_seed(0)
    head = LateSumFusion({m: 3 for m in names}, 4)
    with torch.no_grad():
        head.linears[names[0]].weight.mul_(6.0)  # the first modality dominates the softmax
    latents = {m: torch.randn(n, 3) for m in names}
    fused = head(latents)
    return head, ModelOutput(fused.logits, latents, {}, fused.contributions)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("n", [5, 2, 1])  # the official mask only broadcast at batch size 2
def test_loss_equals_the_formula_with_one_mask_for_the_batch(names, n: int) -> None:
    head, output = _head_and_output(names, n)
    y = torch.arange(n) % 4
    method = AMCo(sigma=0.5, eps=0.3, seed=3)
    method.setup(ModelInfo(names, {m: 3 for m in names}, 4, additive_fusion=True))
    star = method.linear_star
    method.on_epoch_start(EpochContext.standalone(1))
    # second step of epoch 1: l_t = 1 * 1 * 0.1, p_t = sin(pi/6) = 0.5: 2 of the 4 classes masked
    for step in (40, 41):
        ctx = StepContext.standalone(y, fusion=head, epoch=1, step=step)
        terms = method.losses(output, ctx)
    own = {m: output.contributions[m] + head.shared_bias / len(names) for m in names}
    joint = torch.cat(list(own.values()), dim=1).softmax(-1)
    shares = {
        m: float(joint[:, 4 * i : 4 * i + 4].sum(1).mean().detach()) for i, m in enumerate(names)
    }
    dependent = {m: shares[m] > 0.5 for m in names}
    assert dependent[names[0]] and not any(dependent[m] for m in names[1:])
    assert ctx.logs["mask_ratio"] == pytest.approx(0.5)
    mask = class_mask(4, 2, torch.Generator().manual_seed(3 * 1_000_003 + 41))  # (seed, step)
    masked = {m: own[m] * mask if dependent[m] else own[m] for m in names}
    fused = star(sum(masked.values()))
    torch.testing.assert_close(terms["task"], F.cross_entropy(fused, y))
    for m in names:
        torch.testing.assert_close(terms[f"uni_{m}"], F.cross_entropy(masked[m], y))


def test_partial_mask_is_one_row_shared_by_every_sample() -> None:
    names = ("a", "b")
    head, output = _head_and_output(names, 6)
    own = modality_logits(output, head)
    mask = class_mask(4, 2, torch.Generator().manual_seed(0))
    star = torch.nn.Identity()
    y = torch.zeros(6, dtype=torch.long)
    terms = amco_losses(own, {"a": True, "b": False}, mask, star, y)
    masked_a = own["a"] * mask
    assert torch.equal((masked_a == 0).any(0), mask == 0)  # the same classes in every row
    torch.testing.assert_close(terms["task"], F.cross_entropy(masked_a + own["b"], y))
    torch.testing.assert_close(terms["uni_b"], F.cross_entropy(own["b"], y))


def test_schedule_restarts_each_epoch_and_epoch_zero_is_never_masked() -> None:
    method = AMCo()
    method.setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 4, additive_fusion=True))
    ratios = []
    for epoch, steps in ((0, range(0, 5)), (1, range(5, 10))):
        method.on_epoch_start(EpochContext.standalone(epoch))
        for step in steps:
            p_t, mask = method.step_mask(
                4, StepContext.standalone(torch.zeros(1), epoch=epoch, step=step)
            )
            ratios.append(p_t)
            assert int((mask == 0).sum()) == int(p_t * 4)
    expected = [0.0] * 5 + [mask_ratio(k * 0.1, 0.3) for k in range(5)]
    assert ratios == pytest.approx(expected)


def test_prediction_is_the_unmasked_fused_logits_through_the_output_layer() -> None:
    _, output = _head_and_output(("a", "b"), 4)
    method = build_method("amco", {})
    method.setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 4, additive_fusion=True))
    torch.testing.assert_close(method.predict(output), method.linear_star(output.logits))


def test_needs_an_additive_head_and_classification() -> None:
    with pytest.raises(ConfigError, match="additive"):
        AMCo().setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 4, additive_fusion=False))
    with pytest.raises(ConfigError, match="classification"):
        AMCo().setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 1, "regression", True))
    with pytest.raises(ConfigError, match="sigma"):
        build_method("amco", {"sigma": 1.5})


BASE: dict[str, Any] = {
    **COMPETITION_400,
    "method": "amco",
    "train.epochs": 4,
}


def test_amco_learns_the_competition_task(tmp_path: Path) -> None:
    result = fit(resolve_config({**BASE, "train.epochs": 6}), tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
