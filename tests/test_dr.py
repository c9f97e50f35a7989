"""D&R: purity, min-max scaling and the purity gap against known values, the exact soft
re-initialisation, the schedule, a diagnosis that reads only train and validation, exact resume
across a re-initialisation, and learning on the competition preset."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SCHEDULED_LEARN, build_trainer
from sklearn.preprocessing import MinMaxScaler
from torch import nn

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, SplitFeatures, build_method
from mmbalance.methods.dr import (
    DiagnosingRelearning,
    minmax_scale,
    purity,
    purity_gap,
    reinit_strength,
    soft_reinit,
)
from mmbalance.train import Trainer
from mmbalance.train.checkpoint import load_checkpoint

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 160,
    "dataset.n_val": 80,
    "dataset.n_test": 100,
    "dataset.n_bayes": 500,
    "method": "dr",
    "train.batch_size": 32,
    "train.progress": False,
    "train.tensorboard": False,
    "train.epoch_analysis": False,
}


# --- purity and scaling --------------------------------------------------------------------------
def test_purity_of_hand_made_clusters() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    # cluster 0 holds labels 0, 0, 1 (majority 2 of 3); cluster 1 holds 1, 1, 2 (2 of 3)
    assert purity(labels, torch.tensor([0, 0, 0, 1, 1, 1])) == pytest.approx(4 / 6)
    # label and cluster ids need not be contiguous
    assert purity(labels * 7 + 3, torch.tensor([9, 9, 9, 5, 5, 5])) == pytest.approx(4 / 6)
    assert purity(labels, torch.tensor([4, 4, 1, 1, 1, 0])) == 1.0  # a perfect clustering
    assert purity(labels, torch.zeros(6, dtype=torch.long)) == pytest.approx(3 / 6)  # one cluster
    assert purity(labels, torch.arange(6)) == 1.0  # singletons are pure
    with pytest.raises(ValueError):
        purity(labels, torch.zeros(5, dtype=torch.long))


def test_minmax_scale_matches_scikit_learn() -> None:
    torch.manual_seed(0)
    x = torch.randn(20, 4) * torch.tensor([1.0, 5.0, 0.1, 1.0])
    x[:, 3] = 2.5  # a constant column
    expected = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x.double().numpy())
    np.testing.assert_allclose(minmax_scale(x.double()).numpy(), expected, atol=1e-12)


def test_purity_gap_on_separated_blobs() -> None:
    """Three far-apart blobs: k-means finds them. On the training set each blob is one class
    (purity 1); on the validation set blob 0 is class 0, and blobs 1 and 2 each hold 6 samples
    of class 1 and 4 of class 2 (purity (10 + 6 + 6) / 30)."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])

    def blobs(n: int) -> torch.Tensor:
        return torch.cat([c + torch.randn(n, 2, generator=gen) for c in centres])

    train_labels = torch.arange(3).repeat_interleave(10)
    val_labels = torch.tensor([0] * 10 + ([1] * 6 + [2] * 4) * 2)
    p_train, p_val = purity_gap(blobs(10), train_labels, blobs(10), val_labels, 3)
    assert p_train == 1.0
    assert p_val == pytest.approx(22 / 30)


# --- re-initialisation ---------------------------------------------------------------------------
def test_soft_reinit_moves_weights_to_the_convex_combination_exactly() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    params = list(net.parameters())
    initial = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    current = [p.detach().clone() for p in params]
    w = reinit_strength(0.12, 3.0)
    assert w == math.tanh(0.36)
    soft_reinit(params, initial, w)
    for p, p0, p1 in zip(params, initial, current, strict=True):
        assert torch.equal(p.detach(), w * p0 + (1 - w) * p1)
    soft_reinit(params, initial, 1.0)  # full strength: back to the initial weights
    for p, p0 in zip(params, initial, strict=True):
        assert torch.equal(p.detach(), p0)


def test_schedule_follows_the_official_code() -> None:
    method = DiagnosingRelearning(reinit_epoch=20, reinit_num=3)
    # the official loop re-learns after (0-based) epochs 20, 40 and 60, i.e. before 21, 41, 61
    assert [e for e in range(120) if method.relearns_before(e)] == [21, 41, 61]
    assert not any(DiagnosingRelearning(reinit_num=0).relearns_before(e) for e in range(50))


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="reinit_epoch"):
        build_method("dr", {"reinit_epoch": 0})
    with pytest.raises(ConfigError, match="move_lambda"):
        build_method("dr", {"move_lambda": -1.0})


def test_diagnosis_reads_only_train_and_validation() -> None:
    """Every split the method asks for is recorded; the re-initialisation uses the purity gap
    of exactly those features."""
    torch.manual_seed(3)
    encoders = {m: nn.Linear(2, 2) for m in ("a", "b")}
    params = {m: list(e.parameters()) for m, e in encoders.items()}
    method = DiagnosingRelearning(reinit_epoch=1, move_lambda=2.0)
    method.setup(ModelInfo(("a", "b"), {"a": 2, "b": 2}, 3))
    method.on_train_start(EpochContext.standalone(0, encoder_params=params))
    initial = {m: [p.detach().clone() for p in ps] for m, ps in params.items()}
    with torch.no_grad():
        for ps in params.values():
            for p in ps:
                p.add_(1.0)
    before = {m: [p.detach().clone() for p in ps] for m, ps in params.items()}
    gen = torch.Generator().manual_seed(4)
    data = {
        split: SplitFeatures(
            latents={m: torch.randn(30, 2, generator=gen) for m in ("a", "b")},
            logits=torch.zeros(30, 3),
            unimodal_logits={},
            targets=torch.randint(0, 3, (30,), generator=gen),
            index=torch.arange(30),
        )
        for split in ("train", "val")
    }
    asked: list[str] = []

    def features(split: str, fraction: float = 1.0) -> SplitFeatures:
        asked.append(split)
        return data[split]

    ctx = EpochContext.standalone(2, features=features, encoder_params=params)
    method.on_epoch_start(ctx)
    assert sorted(asked) == ["train", "val"]
    for m in ("a", "b"):
        p_train, p_val = purity_gap(
            data["train"].latents[m], data["train"].targets, data["val"].latents[m],
            data["val"].targets, 3,
        )  # fmt: skip
        w = math.tanh(2.0 * abs(p_train - p_val))
        assert ctx.logs[f"reinit_weight_{m}"] == pytest.approx(w)
        for p, p0, p1 in zip(params[m], initial[m], before[m], strict=True):
            assert torch.equal(p.detach(), w * p0 + (1 - w) * p1)


# --- through the trainer -------------------------------------------------------------------------
def _trainer(out: Path, **overrides: Any) -> Trainer:
    return build_trainer(resolve_config({**SMALL, **overrides}), out)


def test_trainer_relearns_towards_the_initial_weights(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "run", **{"train.epochs": 2, "method.reinit_epoch": 1})
    initial = {m: [p.detach().clone() for p in ps] for m, ps in trainer.encoder_params.items()}
    trainer.run(resume=False)  # two epochs of joint training, no re-learning yet
    last = load_checkpoint(tmp_path / "run" / "last.ckpt")
    trainer.module.load_state_dict(last["module"])
    method = trainer.method
    for m, ps in method.state_dict()["initial"].items():
        assert all(torch.equal(a, b) for a, b in zip(ps, initial[m], strict=True))
    asked: list[str] = []
    real = trainer.features

    def features(split: str, fraction: float = 1.0):
        asked.append(split)
        return real(split, fraction)

    trainer.features = features  # type: ignore[method-assign]
    before = {m: [p.detach().clone() for p in ps] for m, ps in trainer.encoder_params.items()}
    ctx = trainer.epoch_context(2)
    assert method.relearns_before(2)
    method.on_epoch_start(ctx)
    assert sorted(asked) == ["train", "val"]
    for m, ps in trainer.encoder_params.items():
        w = ctx.logs[f"reinit_weight_{m}"]
        gap = abs(ctx.logs[f"purity_train_{m}"] - ctx.logs[f"purity_val_{m}"])
        assert w == pytest.approx(math.tanh(3.0 * gap))
        for p, p0, p1 in zip(ps, initial[m], before[m], strict=True):
            assert torch.equal(p.detach(), w * p0 + (1 - w) * p1)


def test_dr_learns_the_competition_preset(competition_metrics) -> None:
    """Well above chance (5 classes: 0.2) with two re-learnings in six epochs."""
    metrics = competition_metrics(
        {
            "method": "dr",
            **SCHEDULED_LEARN,
            "method.reinit_epoch": 2,
        },
        seeds=(0,),
    )
    assert metrics["accuracy"] > 0.7, metrics
