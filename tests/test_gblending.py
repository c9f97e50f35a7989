"""G-Blending: the weights from known losses against the formula, the weighted loss, online and
offline estimation from the held-out and training parts only, exact resume mid-super-epoch, and
learning on the competition preset."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SCHEDULED_LEARN

from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, SplitFeatures, StepContext, build_method
from mmbalance.methods.gblending import GradientBlending, blending_weights, head_losses
from mmbalance.models.output import ModelOutput

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 200,
    "dataset.n_val": 80,
    "dataset.n_test": 100,
    "dataset.n_bayes": 500,
    "method": "gblending",
    "train.batch_size": 32,
    "train.progress": False,
    "train.tensorboard": False,
    "train.epoch_analysis": False,
}


# --- the weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [("fused", "a", "b"), ("fused", "a", "b", "c")])
def test_weights_from_known_losses_equal_the_formula(heads: tuple[str, ...]) -> None:
    gen = torch.Generator().manual_seed(len(heads))
    held_before = {k: 1.5 + float(torch.rand(1, generator=gen)) for k in heads}
    held_after = {k: held_before[k] - float(torch.rand(1, generator=gen)) for k in heads}
    held_after[heads[-1]] = held_before[heads[-1]] + 0.2  # this head's held-out loss rose
    train_after = {k: held_after[k] - 0.1 - float(torch.rand(1, generator=gen)) for k in heads}
    train_before = {k: held_before[k] - 0.05 for k in heads}

    raw = {
        k: abs(held_before[k] - held_after[k]) / (held_after[k] - train_after[k]) ** 2
        for k in heads
    }
    expected = {k: v / sum(raw.values()) for k, v in raw.items()}
    got = blending_weights(held_before, held_after, train_after)
    assert got is not None and got.keys() == expected.keys()
    for k in heads:
        assert got[k] == pytest.approx(expected[k], rel=1e-12)
    assert sum(got.values()) == pytest.approx(1.0)

    # BalanceBenchmark's variant: the squared change of the overfitting
    change = {
        k: (held_after[k] - train_after[k]) - (held_before[k] - train_before[k]) for k in heads
    }
    raw = {k: abs(held_before[k] - held_after[k]) / change[k] ** 2 for k in heads}
    expected = {k: v / sum(raw.values()) for k, v in raw.items()}
    got = blending_weights(held_before, held_after, train_after, train_before)
    assert got is not None
    for k in heads:
        assert got[k] == pytest.approx(expected[k], rel=1e-12)


def test_degenerate_losses() -> None:
    same = {"fused": 1.0, "a": 2.0}
    assert blending_weights(same, same, {"fused": 0.5, "a": 1.0}) is None  # no gain anywhere
    # a head with no overfitting takes (almost) all the weight instead of dividing by zero
    got = blending_weights(
        {"fused": 2.0, "a": 2.0}, {"fused": 1.0, "a": 1.0}, {"fused": 1.0, "a": 0.5}
    )
    assert got is not None and got["fused"] > 1 - 1e-9 and got["a"] > 0


def test_head_losses_are_the_mean_cross_entropies() -> None:
    gen = torch.Generator().manual_seed(5)
    targets = torch.randint(0, 4, (12,), generator=gen)
    logits = {k: torch.randn(12, 4, generator=gen) for k in ("fused", "a", "b")}
    features = SplitFeatures(
        latents={},
        logits=logits["fused"],
        unimodal_logits={"a": logits["a"], "b": logits["b"]},
        targets=targets,
        index=torch.arange(12),
    )
    got = head_losses(features)
    for k, z in logits.items():
        assert got[k] == pytest.approx(float(F.cross_entropy(z, targets)))


# --- the method ----------------------------------------------------------------------------------
def _method(**options: Any) -> GradientBlending:
    method = GradientBlending(**options)
    method.setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 4))
    return method


def test_loss_is_the_weighted_sum_of_head_losses() -> None:
    method = _method()
    assert method.weights == {"fused": 1 / 3, "a": 1 / 3, "b": 1 / 3}  # uniform at first
    method.weights = {"fused": 0.5, "a": 0.2, "b": 0.3}
    gen = torch.Generator().manual_seed(6)
    y = torch.randint(0, 4, (8,), generator=gen)
    z = {k: torch.randn(8, 4, generator=gen) for k in ("fused", "a", "b")}
    output = ModelOutput(z["fused"], {}, {"a": z["a"], "b": z["b"]})
    losses = method.losses(output, StepContext.standalone(y))
    assert losses.keys() == {"task", "uni_a", "uni_b"}
    torch.testing.assert_close(losses["task"], 0.5 * F.cross_entropy(z["fused"], y))
    torch.testing.assert_close(losses["uni_a"], 0.2 * F.cross_entropy(z["a"], y))
    torch.testing.assert_close(losses["uni_b"], 0.3 * F.cross_entropy(z["b"], y))


class FakeSplits:
    """Feature passes whose logits change with every call; records the splits read."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.gen = torch.Generator().manual_seed(7)

    def __call__(self, split: str, fraction: float = 1.0) -> SplitFeatures:
        self.asked.append(split)
        return SplitFeatures(
            latents={},
            logits=torch.randn(20, 4, generator=self.gen),
            unimodal_logits={m: 2 * torch.randn(20, 4, generator=self.gen) for m in ("a", "b")},
            targets=torch.randint(0, 4, (20,), generator=self.gen),
            index=torch.arange(20),
        )


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_estimates_read_held_out_and_train_only(mode: str, monkeypatch) -> None:
    method = _method(super_epoch=2, mode=mode)
    splits = FakeSplits()
    measured: list[dict[str, float]] = []
    real = head_losses

    def recording(features: SplitFeatures) -> dict[str, float]:
        measured.append(real(features))
        return measured[-1]

    monkeypatch.setattr("mmbalance.methods.gblending.head_losses", recording)
    method.on_train_start(EpochContext.standalone(0, features=splits))
    history = [dict(method.weights)]
    for epoch in range(6):
        method.on_epoch_end(EpochContext.standalone(epoch, features=splits))
        history.append(dict(method.weights))
    assert set(splits.asked) == {"held_out", "train"}  # never val, never test
    # measurements: (held_out, train) at the start and after epochs 1, 3, 5 (online) or 1 only
    boundaries = 4 if mode == "online" else 2
    assert len(measured) == 2 * boundaries
    assert history[1] == history[0]  # epoch 0: still uniform
    first = blending_weights(measured[0], measured[2], measured[3])
    assert history[2] == first  # after epoch 1, the first super-epoch
    if mode == "online":
        second = blending_weights(measured[2], measured[4], measured[5])
        assert history[4] == second != first
        assert history[6] == blending_weights(measured[4], measured[6], measured[7])
    else:
        assert all(h == first for h in history[2:])


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="held_out"):
        build_method("gblending", {"held_out": 0.0})
    with pytest.raises(ConfigError, match="super_epoch"):
        build_method("gblending", {"super_epoch": 0})
    with pytest.raises(ConfigError, match="mode"):
        build_method("gblending", {"mode": "sometimes"})
    assert _method(held_out=0.25).held_out_fraction == 0.25


# --- through the trainer -------------------------------------------------------------------------
def test_gblending_learns_the_competition_preset(competition_metrics) -> None:
    """Well above chance (5 classes: 0.2) with two weight estimates in six epochs."""
    metrics = competition_metrics(
        {
            "method": "gblending",
            **SCHEDULED_LEARN,
            "method.super_epoch": 2,
        },
        seeds=(0,),
    )
    assert metrics["accuracy"] > 0.7, metrics
