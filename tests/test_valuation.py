"""Modality valuation: per-sample Shapley values against the formula (M = 2 and 3), the
sample-level and modality-level selection rules, the copy loss terms, learning on the
competition preset and exact resumption."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_COMPETITION as CONFTEST_SMALL_COMPETITION

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import ModelInfo, StepContext, build_method
from mmbalance.methods.valuation import (
    Valuation,
    coalition_values,
    keep_only,
    modality_copies,
    sample_copies,
    shapley_values,
)
from mmbalance.models.output import FusionOutput, ModelOutput
from mmbalance.train import fit

SMALL_COMPETITION: dict[str, Any] = {
    **CONFTEST_SMALL_COMPETITION,
    "method": "valuation",
    "method.warmup_epochs": 1,
}


def summed(latents: Mapping[str, torch.Tensor], stop_grad: Sequence[str] = ()) -> FusionOutput:
    """A fusion head whose logits are the sum of the (class-sized) latents."""
    return FusionOutput(torch.stack(list(latents.values())).sum(0))


def _correct(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [float(int(logits[i].argmax()) == int(y[i])) for i in range(len(y))]


# --- Shapley values on fixed tensors -------------------------------------------------------------
def test_two_modalities_match_the_official_closed_form() -> None:
    a = torch.tensor([[3.0, 0, 0], [0, 2, 0], [1, 0, 0], [0, 0, 1]])
    b = torch.tensor([[0.0, 1, 0], [0, 3, 0], [0, 0, 2], [2, 0, 0]])
    y = torch.tensor([0, 1, 0, 2])
    phi = shapley_values(coalition_values(summed, {"a": a, "b": b}, y), ["a", "b"])
    ca, cb, cab = _correct(a, y), _correct(b, y), _correct(a + b, y)
    for i in range(4):
        v_a, v_b, v_ab = 1.0 * ca[i], 1.0 * cb[i], 2.0 * cab[i]  # v(S) = |S| * correct
        assert float(phi["a"][i]) == pytest.approx((v_a + v_ab - v_b) / 2)
        assert float(phi["b"][i]) == pytest.approx((v_b + v_ab - v_a) / 2)
    # sample 0: a alone right, b alone wrong, both right -> a 1.5, b 0.5
    assert phi["a"][0] == 1.5 and phi["b"][0] == 0.5
    # sample 2: a right alone, fused wrong (b pulls to class 2) -> a 0.5, b -0.5
    assert phi["a"][2] == 0.5 and phi["b"][2] == -0.5


def test_three_modalities_match_the_formula_and_are_efficient() -> None:
    gen = torch.Generator().manual_seed(0)
    latents = {m: torch.randn(12, 4, generator=gen) for m in ("a", "b", "c")}
    y = torch.randint(0, 4, (12,), generator=gen)
    phi = shapley_values(coalition_values(summed, latents, y), ["a", "b", "c"])

    def v(coalition: str, i: int) -> float:
        if not coalition:
            return 0.0
        logits = sum(latents[m] for m in coalition)
        return len(coalition) * float(int(logits[i].argmax()) == int(y[i]))

    for i in range(12):
        for m, (p, q) in {"a": ("b", "c"), "b": ("a", "c"), "c": ("a", "b")}.items():
            expected = (
                (v(m, i) - v("", i)) / 3  # |S| = 0: 0! 2! / 3!
                + (v(m + p, i) - v(p, i)) / 6  # |S| = 1: 1! 1! / 3!
                + (v(m + q, i) - v(q, i)) / 6
                + (v(m + p + q, i) - v(p + q, i)) / 3  # |S| = 2: 2! 0! / 3!
            )
            assert float(phi[m][i]) == pytest.approx(expected)
        total = sum(float(phi[m][i]) for m in "abc")
        assert total == pytest.approx(v("abc", i), abs=1e-6)  # efficiency: they share v(N)
        assert all(abs(float(phi[m][i]) * 6 - round(float(phi[m][i]) * 6)) < 1e-6 for m in "abc")


def test_removal_zeroes_the_other_latents() -> None:
    latents = {"a": torch.ones(2, 3), "b": 2 * torch.ones(2, 3), "c": torch.ones(2, 3)}
    kept = keep_only(latents, ["b"])
    assert torch.equal(kept["b"], latents["b"])
    assert not kept["a"].any() and not kept["c"].any()


# --- the selection rules ------------------------------------------------------------------------
def test_sample_level_copies_follow_the_thresholds() -> None:
    phi = torch.tensor([-0.5, -0.1, 0.0, 0.39, 0.4, 0.5, 0.89, 0.9, 1.0, 1.5])
    assert sample_copies(phi, [-0.1, 0.4, 0.9]).tolist() == [3, 2, 2, 2, 1, 1, 1, 0, 0, 0]


def test_modality_level_copies_follow_the_gap_rule() -> None:
    n = 200
    phi = {"a": torch.full((n,), 1.0), "b": torch.where(torch.arange(n) % 2 == 0, 0.5, -0.5)}
    phi["b"][:10] = 1.5  # some variation inside the subset
    copies, means = modality_copies(phi, 0.2, 1.0, torch.Generator().manual_seed(3))
    # recompute with the same draws: the subset, then the chosen samples
    gen = torch.Generator().manual_seed(3)
    part = torch.randint(n, (40,), generator=gen)
    c_a, c_b = float(phi["a"][part].mean()), float(phi["b"][part].mean())
    assert means == {"a": pytest.approx(c_a), "b": pytest.approx(c_b)}
    count = int(abs((1 - c_a) - (1 - c_b)) * 2 / 3 * 1.0 * n)
    chosen = torch.randint(n, (count,), generator=gen)
    assert torch.equal(copies["b"], torch.bincount(chosen, minlength=n))  # b contributes less
    assert int(copies["b"].sum()) == count > 0 and not copies["a"].any()


# --- the step -------------------------------------------------------------------------------------
def test_copy_terms_are_weighted_single_modality_losses() -> None:
    torch.manual_seed(0)
    method = Valuation()
    method.setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 3))
    method.copies = torch.tensor([[0, 0], [2, 0], [0, 1], [3, 1], [0, 0]])  # by dataset index
    latents = {"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 3)}
    y = torch.tensor([0, 1, 2, 1])
    index = torch.tensor([3, 1, 0, 2])  # the batch's dataset indices
    output = ModelOutput(summed(latents).logits, latents)
    ctx = StepContext.standalone(y, fusion=summed, index=index)
    terms = method.losses(output, ctx)
    assert set(terms) == {"task", "copy_a", "copy_b"}
    torch.testing.assert_close(terms["task"], F.cross_entropy(output.logits, y))
    ce_a = F.cross_entropy(latents["a"], y, reduction="none")  # only a kept: logits = z_a
    ce_b = F.cross_entropy(latents["b"], y, reduction="none")
    torch.testing.assert_close(terms["copy_a"], (3 * ce_a[0] + 2 * ce_a[1]) / 4)
    torch.testing.assert_close(terms["copy_b"], (1 * ce_b[0] + 1 * ce_b[3]) / 4)
    terms["copy_a"].backward()  # only the kept modality's latent receives the gradient
    assert latents["a"].grad[2].abs().sum() == 0 and latents["a"].grad[0].abs().sum() > 0


def test_before_the_first_valuation_only_the_task_loss() -> None:
    method = Valuation()
    method.setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 3))
    latents = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    output = ModelOutput(summed(latents).logits, latents)
    ctx = StepContext.standalone(torch.zeros(4, dtype=torch.long), fusion=summed)
    assert list(method.losses(output, ctx)) == ["task"]


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="thresholds"):
        build_method("valuation", {"thresholds": [0.4, -0.1, 0.9]})
    with pytest.raises(ConfigError, match="part_ratio"):
        build_method("valuation", {"part_ratio": 0})
    with pytest.raises(ConfigError, match="warmup"):
        build_method("valuation", {"warmup_epochs": 0})


# --- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["sample", "modality"])
def test_valuation_learns_the_competition_preset(tmp_path: Path, level: str) -> None:
    over = {**SMALL_COMPETITION, "method.level": level}
    result = fit(resolve_config(over), tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.7  # chance is 0.2 (5 classes)
    rows = result.history
    assert rows[0]["method_shapley_m1"] > rows[0]["method_shapley_m2"]  # m1 dominates
    assert "train_copy_m2" in rows[1] and rows[1]["train_copy_m2"] > 0
    assert math.isclose(rows[0]["train_loss"], rows[0]["train_task"])  # no copies in epoch 0
