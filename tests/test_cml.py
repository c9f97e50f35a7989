"""CML: partial predictions (subtracted contributions, zeroed latents), the confidence constraint
and the total loss against values computed here from the formula, the per-epoch removal order,
and learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPETITION_400

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import StepContext, build_method
from mmbalance.methods.cml import (
    chain_losses,
    confidence_violation,
    partial_logits,
    removal_order,
)
from mmbalance.models.fusion import ConcatLinearFusion, FiLMFusion, LateSumFusion
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit


def _output(head, latents) -> ModelOutput:
    fused = head(latents)
    return ModelOutput(fused.logits, dict(latents), {}, fused.contributions)


def _latents(dims: dict[str, int], n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=gen) for m, d in dims.items()}


def test_confidence_violation_hand_values() -> None:
    fewer = torch.tensor([0.9, 0.2, 0.6])
    more = torch.tensor([0.5, 0.7, 0.6])
    # batch: max(0, 0.4 - 0.5 + 0) = 0; per sample: 0.4
    assert float(confidence_violation(fewer, more, "batch")) == 0.0
    assert float(confidence_violation(fewer, more, "sample")) == pytest.approx(0.4)
    assert float(confidence_violation(more + 0.1, more, "batch")) == pytest.approx(0.3)


@pytest.mark.parametrize("head_cls", [LateSumFusion, ConcatLinearFusion])
def test_additive_partial_prediction_drops_the_removed_contributions(head_cls) -> None:
    torch.manual_seed(0)
    dims = {"a": 4, "b": 3, "c": 5}
    head = head_cls(dims, 4)
    latents = _latents(dims)
    output = _output(head, latents)
    kept = output.contributions["b"]
    torch.testing.assert_close(
        partial_logits(output, ["a", "c"]), kept + head.bias
    )  # BalanceBenchmark's out - (W_m h_m + b/M) + b/M: the bias stays whole
    # the same as re-running the head with the removed latents zeroed
    zeroed = {m: torch.zeros_like(z) if m in ("a", "c") else z for m, z in latents.items()}
    torch.testing.assert_close(partial_logits(output, ["a", "c"]), head(zeroed).logits)


def test_non_additive_partial_prediction_reruns_the_head_on_zeroed_latents() -> None:
    torch.manual_seed(0)
    dims = {"a": 4, "b": 3}
    head = FiLMFusion(dims, 4)
    latents = _latents(dims)
    output = _output(head, latents)
    expected = head({"a": latents["a"], "b": torch.zeros(6, 3)}).logits
    torch.testing.assert_close(partial_logits(output, ["b"], head), expected)
    with pytest.raises(ConfigError, match="needs the head"):
        partial_logits(output, ["b"], None)


@pytest.mark.parametrize("dims", [{"a": 4, "b": 3}, {"a": 4, "b": 3, "c": 2}])
@pytest.mark.parametrize("hinge", ["batch", "sample"])
def test_total_loss_equals_the_formula(dims: dict[str, int], hinge: str) -> None:
    torch.manual_seed(2)
    head = LateSumFusion(dims, 5)
    output = _output(head, _latents(dims, n=8, seed=3))
    y = torch.randint(0, 5, (8,))
    method = build_method("cml", {"lam": 0.7, "hinge": hinge, "seed": 4})
    terms = method.losses(output, StepContext.standalone(y, fusion=head, epoch=3))
    # the chain, written out: remove r_1, then r_2, ... keeping the bias
    order = removal_order(list(dims), 4, 3)
    chain = [output.logits]
    for k in range(1, len(dims)):
        removed = order[:k]
        chain.append(
            sum(output.contributions[m] for m in dims if m not in removed) + head.shared_bias
        )
    m = len(dims)
    ce = [F.cross_entropy(z, y) for z in chain]
    conf = [z.softmax(-1).max(-1).values for z in chain]
    if hinge == "batch":
        viol = sum(max(0.0, float((conf[k] - conf[k - 1]).detach().sum())) for k in range(1, m))
    else:
        viol = sum(float((conf[k] - conf[k - 1]).detach().clamp_min(0).sum()) for k in range(1, m))
    torch.testing.assert_close(terms["task"], ce[0] / m)
    torch.testing.assert_close(terms["partial"], sum(ce[1:]) / m)
    assert float(terms["conf"].detach()) == pytest.approx(0.7 * viol, abs=1e-6)


def test_a_step_against_the_constraint_gradient_reduces_the_violation() -> None:
    head = LateSumFusion({"a": 3, "b": 3}, 3)
    with torch.no_grad():
        for linear in head.linears.values():
            linear.weight.copy_(torch.eye(3))
    # fused [3, 2, 0] is less confident than b alone [3, 0, 0]: removing a raises confidence
    latents = {
        "a": torch.tensor([[0.0, 2.0, 0.0]] * 4, requires_grad=True),
        "b": torch.tensor([[3.0, 0.0, 0.0]] * 4, requires_grad=True),
    }
    y = torch.zeros(4, dtype=torch.long)
    _, violation = chain_losses(_output(head, latents), y, ["a", "b"], head, "batch")
    assert violation.item() > 0
    violation.backward()
    with torch.no_grad():
        stepped = {m: z - 0.1 * z.grad for m, z in latents.items()}
        _, after = chain_losses(_output(head, stepped), y, ["a", "b"], head, "batch")
    assert after.item() < violation.item()


def test_removal_order_is_a_permutation_per_epoch_and_seed() -> None:
    mods = ["a", "b", "c"]
    orders = {tuple(removal_order(mods, 0, e)) for e in range(20)}
    assert all(sorted(o) == mods for o in orders) and len(orders) > 1
    assert removal_order(mods, 0, 7) == removal_order(mods, 0, 7)
    assert removal_order(["a", "b"], 1, 0) in (["a", "b"], ["b", "a"])


def test_bad_options_and_regression_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lam"):
        build_method("cml", {"lam": -1})
    with pytest.raises(ConfigError, match="hinge"):
        build_method("cml", {"hinge": "both"})
    with pytest.raises(ConfigError, match="classification"):
        fit(
            resolve_config({"dataset": "synthetic", "dataset.task": "regression", "method": "cml"}),
            tmp_path / "run",
        )


@pytest.mark.parametrize("fusion", ["late_sum", "concat_mlp"])
def test_cml_learns_the_competition_task(tmp_path: Path, fusion: str) -> None:
    cfg = resolve_config(
        {
            **COMPETITION_400,
            "method": "cml",
            "fusion": fusion,
            "train.epochs": 6,
        }
    )
    result = fit(cfg, tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    assert all(r["train_partial"] > 0 for r in result.history)
