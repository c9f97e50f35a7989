"""Tests of PMR: prototypes as class means and their EMA, distances, scores, the weak-modality
rule and the loss against the formulas (M = 2 and 3), the entropy option, resume and a learning
test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARN

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, SplitFeatures, StepContext, build_method
from mmbalance.methods.pmr import (
    prototype_distances,
    prototype_entropy,
    prototype_scores,
    update_prototypes,
    weak_modalities,
)
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit


# --- prototypes -----------------------------------------------------------------------------------
def test_prototypes_are_class_means_then_an_ema() -> None:
    torch.manual_seed(0)
    z = torch.randn(20, 3)
    y = torch.tensor([0, 1, 2] * 6 + [0, 0])
    first = update_prototypes(None, z, y, 4, momentum=0.3)
    for k in range(3):
        torch.testing.assert_close(first[k], z[y == k].mean(0))
    torch.testing.assert_close(first[3], z.mean(0))  # class 3 absent: mean of everything
    z2, y2 = torch.randn(9, 3), torch.tensor([0, 0, 1, 1, 1, 3, 3, 3, 3])
    second = update_prototypes(first, z2, y2, 4, momentum=0.3)
    for k in (0, 1, 3):
        torch.testing.assert_close(second[k], 0.7 * z2[y2 == k].mean(0) + 0.3 * first[k])
    torch.testing.assert_close(second[2], first[2])  # class 2 absent this time: kept


def _features(latents: dict[str, torch.Tensor], targets: torch.Tensor):
    calls: list[tuple[str, float]] = []

    def features(split: str, fraction: float = 1.0) -> SplitFeatures:
        calls.append((split, fraction))
        return SplitFeatures(latents, torch.zeros(len(targets), 3), {}, targets, torch.arange(3))

    return features, calls


def test_epoch_start_builds_prototypes_from_the_training_features_it_is_given() -> None:
    method = build_method("pmr", {"fraction": 0.25, "momentum": 0.5, "ema_start_epoch": 1})
    method.setup(ModelInfo(("a", "v"), {"a": 2, "v": 3}, 3))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    latents = {"a": torch.randn(6, 2), "v": torch.randn(6, 3)}
    features, calls = _features(latents, y)
    method.on_epoch_start(EpochContext.standalone(0, features=features))
    assert calls == [("train", 0.25)]
    for m, z in latents.items():
        for k in range(3):
            torch.testing.assert_close(method.prototypes[m][k], z[y == k].mean(0))
    old = {m: c.clone() for m, c in method.prototypes.items()}
    newer = {m: z + 1.0 for m, z in latents.items()}
    features, _ = _features(newer, y)
    method.on_epoch_start(EpochContext.standalone(1, features=features))
    for m, z in newer.items():
        for k in range(3):
            torch.testing.assert_close(
                method.prototypes[m][k], 0.5 * z[y == k].mean(0) + 0.5 * old[m][k]
            )


@pytest.mark.parametrize("ema_start_epoch", [2, 1])
def test_the_official_schedule_averages_from_the_third_epoch(ema_start_epoch: int) -> None:
    """The official code's prototypes: plain class means in epochs 0 and 1, the moving average
    from epoch 2 (ema_start_epoch=2, default); ema_start_epoch=1 averages from epoch 1."""
    method = build_method("pmr", {"momentum": 0.2, "ema_start_epoch": ema_start_epoch})
    assert build_method("pmr", {}).params.ema_start_epoch == 2
    method.setup(ModelInfo(("a", "v"), {"a": 2, "v": 2}, 3))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    torch.manual_seed(3)
    epochs = [{"a": torch.randn(6, 2), "v": torch.randn(6, 2)} for _ in range(3)]
    means = [
        {m: torch.stack([z[y == k].mean(0) for k in range(3)]) for m, z in e.items()}
        for e in epochs
    ]
    expected = [means[0]]
    for e in (1, 2):
        if e >= ema_start_epoch:
            expected.append({m: 0.8 * means[e][m] + 0.2 * expected[-1][m] for m in means[e]})
        else:
            expected.append(means[e])
    for e, latents in enumerate(epochs):
        features, _ = _features(latents, y)
        method.on_epoch_start(EpochContext.standalone(e, features=features))
        for m in ("a", "v"):
            torch.testing.assert_close(method.prototypes[m], expected[e][m])


# --- distances, scores, weak modality --------------------------------------------------------------
def test_distances_and_scores_match_the_formula() -> None:
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    d = prototype_distances(z, c)
    torch.testing.assert_close(d, torch.tensor([[1e-6, 3.0], [5.0, 4.0]]))  # sqrt(1e-12) floor
    y = torch.tensor([0, 1])
    s = prototype_scores({"a": d, "v": torch.zeros(2, 2)}, y)
    p0 = math.exp(-1e-6) / (math.exp(-1e-6) + math.exp(-3.0))
    p1 = math.exp(-4.0) / (math.exp(-5.0) + math.exp(-4.0))
    torch.testing.assert_close(s, torch.tensor([p0 + p1, 1.0]))


def test_weak_modality_rule_is_the_official_binary_rule_for_two() -> None:
    # rho = s_a / s_v > 1: visual is weak; < 1: audio; = 1: none
    torch.testing.assert_close(weak_modalities(torch.tensor([5.0, 3.0])), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(weak_modalities(torch.tensor([2.0, 3.0])), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weak_modalities(torch.tensor([3.0, 3.0])), torch.tensor([0.0, 0.0]))
    # three modalities: below the mean of the other two
    s = torch.tensor([6.0, 2.0, 4.5])  # others' means: 3.25, 5.25, 4.0
    torch.testing.assert_close(weak_modalities(s), torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("m", [2, 3])
def test_loss_adds_alpha_prototype_ce_of_the_weak_modalities(m: int) -> None:
    torch.manual_seed(m)
    names = ["a", "v", "t"][:m]
    method = build_method("pmr", {"alpha": 1.7, "lam_entropy": 0.3, "entropy_epochs": 2})
    method.setup(ModelInfo(tuple(names), {n: 3 for n in names}, 4))
    method.prototypes = {n: torch.randn(4, 3) for n in names}
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    # modality "a" sits on its prototypes (strong), the others are noise
    latents = {n: torch.randn(6, 3, requires_grad=True) for n in names}
    latents["a"] = (method.prototypes["a"][y] + 0.01 * torch.randn(6, 3)).requires_grad_()
    logits = torch.randn(6, 4)
    output = ModelOutput(logits, latents)
    for epoch in (0, 3):
        ctx = StepContext.standalone(y, epoch=epoch)
        terms = method.losses(output, ctx)
        d = {n: prototype_distances(z, method.prototypes[n]) for n, z in latents.items()}
        scores = torch.stack([(-d[n]).softmax(1)[torch.arange(6), y].sum() for n in names])
        others = (scores.sum() - scores) / (m - 1)
        weak = [n for i, n in enumerate(names) if scores[i] < others[i]]
        assert "a" not in weak and weak
        expected = sum(1.7 * F.cross_entropy(-d[n], y) for n in weak)
        torch.testing.assert_close(terms["task"], F.cross_entropy(logits, y))
        torch.testing.assert_close(terms["prototype"], expected)
        if epoch < 2:  # entropy of the dominant modality ("a"), maximised
            p = (-d["a"]).softmax(1)
            entropy = -(p * p.log()).sum(1).mean()
            torch.testing.assert_close(terms["entropy"], -0.3 * entropy)
            torch.testing.assert_close(prototype_entropy(d["a"]), entropy)
        else:
            assert "entropy" not in terms
        for n in names:
            assert ctx.logs[f"weight_{n}"] == (1.7 if n in weak else 0.0)


def test_outside_the_window_only_the_task_loss_remains() -> None:
    method = build_method("pmr", {"start": 2, "end": 4})
    method.setup(ModelInfo(("a", "v"), {"a": 2, "v": 2}, 3))
    method.prototypes = {"a": torch.randn(3, 2), "v": torch.randn(3, 2)}
    output = ModelOutput(torch.randn(4, 3), {"a": torch.randn(4, 2), "v": torch.randn(4, 2)})
    y = torch.tensor([0, 1, 2, 0])
    for epoch, inside in ((1, False), (2, True), (4, True), (5, False)):
        terms = method.losses(output, StepContext.standalone(y, epoch=epoch))
        assert ("prototype" in terms) == inside, epoch


def test_bad_options_raise_config_errors() -> None:
    bad_options = (
        {"alpha": -1},
        {"momentum": 1.0},
        {"fraction": 0},
        {"start": 3, "end": 1},
        {"ema_start_epoch": 0},
    )
    for bad in bad_options:
        with pytest.raises(ConfigError):
            build_method("pmr", bad)


# --- training -------------------------------------------------------------------------------------
def test_pmr_learns_the_competition_preset(tmp_path: Path) -> None:
    result = fit(resolve_config({**LEARN, "method": "pmr"}), tmp_path / "pmr")
    assert result.metrics["test"]["accuracy"] >= 0.8  # chance is 0.2 (5 classes)
