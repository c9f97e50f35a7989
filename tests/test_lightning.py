"""BalancedModule: a method under lightning.Trainer trains as our trainer does (the same step
protocol), resumes exactly from a Lightning checkpoint loaded safely, and runs under DDP."""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from mmbalance.builder import build_dataset, build_model, make_fabric, resolve_config
from mmbalance.errors import ConfigError, DataError
from mmbalance.lightning import CHECKPOINT_KEY, BalancedModule
from mmbalance.methods import METHODS
from mmbalance.optim import build_optimizer
from mmbalance.train.batching import EpochBatchSampler, ShardBatchSampler, make_loader
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
            "train.epoch_curves": False,
        }
    )


class _Parts:
    """What a user of BalancedModule has: the model's parts, its data and the trainer's batches,
    built from the config's seed exactly as our trainer builds them."""

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        t = cfg.train
        make_fabric(cfg).seed_everything(t.seed, verbose=False)
        self.data = build_dataset(cfg)
        self.method = METHODS.get(cfg.method.name)(cfg.method.params)  # its resolved Params
        self.model = build_model(cfg, self.data, self.method)
        train, _ = _hold_out(self.data.splits["train"], self.method, t.seed)
        sampler = EpochBatchSampler(len(train), t.batch_size, t.seed, rank, world, indices=train)
        self.loader = make_loader(self.data.splits["train"], sampler, 0)
        val = self.data.splits["val"]
        self.val_loader = make_loader(val, ShardBatchSampler(len(val), 2 * t.batch_size), 0)
        self.module = BalancedModule(
            self.method,
            dict(self.model.encoders),
            self.model.fusion,
            dict(self.model.unimodal_heads) or None,
            optimizer=functools.partial(build_optimizer, t=t),
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


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """MCR (random permutations, its own CEB head) with validation: two epochs, a checkpoint
    from ModelCheckpoint, a third epoch resumed from it in a fresh process state (loaded with
    ``weights_only=True``) end in the weights and epoch rows of three uninterrupted epochs."""
    cfg = _config("mcr", epochs=3)
    full = _Parts(cfg)
    _lightning(3).fit(full.module, full.loader, full.val_loader)

    first = _Parts(cfg)
    saving = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _lightning(2, callbacks=[saving], enable_checkpointing=True).fit(
        first.module, first.loader, first.val_loader
    )
    last = tmp_path / "last.ckpt"
    state = torch.load(last, weights_only=True)[CHECKPOINT_KEY]  # tensors and plain values only
    assert state["step"] == 8 and not state["epoch_open"] and len(state["history"]) == 2

    torch.manual_seed(1234)  # another process's random state: the checkpoint's is restored
    resumed = _Parts(cfg)
    _lightning(3).fit(
        resumed.module, resumed.loader, resumed.val_loader, ckpt_path=last, weights_only=True
    )
    want, got = _weights(full.module), _weights(resumed.module)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert resumed.module.adapter.history == full.module.adapter.history
    assert {"val_accuracy", "val_loss"} <= set(full.module.adapter.history[-1])
    assert not torch.equal(_weights(first.module)[key], want[key])  # the third epoch trained

    state["epoch_open"] = True  # written inside an epoch (after validation, before on_epoch_end)
    with pytest.raises(DataError, match="inside an epoch"):
        _Parts(cfg).module.on_load_checkpoint({CHECKPOINT_KEY: state})


class _ShardedData(pl.LightningDataModule):
    """Each process's share of every global batch (as our trainer shards them under DDP)."""

    def __init__(self, cfg: Any, data: Any, method: Any) -> None:
        super().__init__()
        self.cfg, self.dataset = cfg, data.splits["train"]
        self.index, _ = _hold_out(self.dataset, method, cfg.train.seed)

    def train_dataloader(self) -> Any:
        t, trainer = self.cfg.train, self.trainer
        sampler = EpochBatchSampler(
            len(self.index), t.batch_size, t.seed, trainer.global_rank, trainer.world_size,
            indices=self.index,
        )  # fmt: skip
        return make_loader(self.dataset, sampler, 0)


def test_two_ddp_processes_train_as_one_on_the_whole_batch() -> None:
    """OGM-GE (its coefficients from scores summed over processes, its gradient rewrite after
    DDP's averaging) in two gloo processes, each on half of every batch, ends in the weights of
    one process on whole batches."""
    cfg = _config("ogm_ge", epochs=2)
    one = _Parts(cfg)
    _lightning(2).fit(one.module, one.loader)

    two = _Parts(cfg)
    strategy = DDPStrategy(
        start_method="spawn", process_group_backend="gloo", find_unused_parameters=True
    )
    ddp = _lightning(2, devices=2, strategy=strategy, use_distributed_sampler=False)
    before = _weights(two.module)
    ddp.fit(two.module, datamodule=_ShardedData(cfg, two.data, two.method))
    want, got = _weights(one.module), _weights(two.module)  # the first process's weights
    assert any(not torch.equal(before[k], got[k]) for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_bad_method_name_is_one_line() -> None:
    parts = _Parts(_config("joint"))
    with pytest.raises(ConfigError) as err:
        BalancedModule("no_such_method", dict(parts.model.encoders), parts.model.fusion)
    assert "no_such_method" in str(err.value) and "\n" not in str(err.value)


def test_a_method_that_grows_its_module_is_refused_in_one_line() -> None:
    parts = _Parts(_config("joint"))
    with pytest.raises(ConfigError) as err:
        BalancedModule("aug", dict(parts.model.encoders), parts.model.fusion)
    assert "'aug'" in str(err.value) and "\n" not in str(err.value)


def test_without_lightning_pytorch_the_import_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "mmbalance.lightning")
    with pytest.raises(ConfigError, match=r"pip install") as err:
        importlib.import_module("mmbalance.lightning")
    assert "\n" not in str(err.value)
