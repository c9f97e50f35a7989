"""BalancedModule: a method under lightning.Trainer trains as our trainer does (the same step
protocol), resumes exactly from a Lightning checkpoint loaded safely, and runs under DDP."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from mmbalance.build import build_dataset, build_model, make_fabric, resolve_config
from mmbalance.errors import ConfigError, DataError
from mmbalance.lightning import CHECKPOINT_KEY, BalancedModule
from mmbalance.methods import build_method
from mmbalance.optim import build_optimizer
from mmbalance.train.batching import EpochBatchSampler, make_loader
from mmbalance.train.loop import _hold_out

#: the options of the equivalence runs: MCR with its own trainable head and three permutations
OPTIONS: dict[str, dict[str, Any]] = {
    "mcr": {"lam_ceb": 0.5, "num_permutations": 3},
    "ogm_ge": {},
    "mla": {},
}


def _config(name: str, epochs: int = 1) -> Any:
    """A tiny synthetic run: 160 training samples in batches of 40 (4 steps an epoch)."""
    return resolve_config(
        {
            "dataset": "synthetic",
            "dataset.input_dim": 12,
            "dataset.n_train": 160,
            "dataset.n_val": 40,
            "dataset.n_test": 40,
            "dataset.n_bayes": 100,
            "encoder.m1.hidden": [16],
            "encoder.m1.out_dim": 8,
            "encoder.m2.hidden": [16],
            "encoder.m2.out_dim": 8,
            "method": name,
            **{f"method.{k}": v for k, v in OPTIONS.get(name, {}).items()},
            "train.epochs": epochs,
            "train.batch_size": 40,
            "train.optimizer": "sgd",
            "train.lr": 0.05,
            "train.progress": False,
            "train.tensorboard": False,
            "train.epoch_analysis": False,
        }
    )


class _Parts:
    """What a user of BalancedModule has: the model's parts, its data and the trainer's batches,
    built from the config's seed exactly as our trainer builds them."""

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        t = cfg.train
        make_fabric(cfg).seed_everything(t.seed, verbose=False)
        self.data = build_dataset(cfg)
        self.method = build_method(cfg.method.name, cfg.method.params)
        self.model = build_model(cfg, self.data, self.method)
        train, _ = _hold_out(self.data.splits["train"], self.method, t.seed)
        sampler = EpochBatchSampler(len(train), t.batch_size, t.seed, rank, world, indices=train)
        self.loader = make_loader(self.data.splits["train"], sampler, 0)
        self.module = BalancedModule(
            self.method,
            dict(self.model.encoders),
            self.model.fusion,
            dict(self.model.unimodal_heads) or None,
            optimizer=lambda groups: build_optimizer(groups, t),
            task=self.data.task,
        )


def _lightning(max_epochs: int, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(max_epochs=max_epochs, **{**options, **kwargs})


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_module_matches_the_trainers_first_steps(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same model, batches, seed and optimizer: after the first epoch's 4 steps (MLA: one
    optimizer step per modality and batch) the weights, the method's own module (MCR's CEB head)
    and the step count equal our trainer's, to rounding."""
    from tests.conftest import build_trainer

    monkeypatch.setattr("mmbalance.train.loop.analyze_model", lambda *a, **k: ({}, {}))
    monkeypatch.setattr("mmbalance.train.loop.robustness_metrics", lambda *a, **k: {})
    cfg = _config(name)
    trainer = build_trainer(cfg, tmp_path / "run", callbacks=[])
    trainer.run(resume=False)
    assert trainer.step == 4

    parts = _Parts(cfg)
    before = _weights(parts.module.step_module)
    _lightning(1).fit(parts.module, parts.loader)
    ours = _weights(trainer.protocol.module)
    theirs = _weights(parts.module.step_module)
    assert set(ours) == set(theirs)
    for key, want in ours.items():
        torch.testing.assert_close(theirs[key], want, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(before[k], theirs[k]) for k in theirs)  # it trained
    assert parts.module.adapter.step == 4
    if name == "mcr":
        assert any(k.startswith("method_module.") for k in theirs)  # the CEB head trained too
