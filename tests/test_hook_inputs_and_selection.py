"""What the trainer hands the epoch hooks beyond feature passes (the encoders as built before
unimodal pre-training, the raw batches of a training split) and what the selected checkpoint
holds (the method's own module, with the model of the same epoch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HOOKS_BASE as BASE
from conftest import make_trainer
from torch import Tensor, nn

from mmbalance.builder import (
    build_components,
    build_dataset,
    make_fabric,
    resolve_config,
)
from mmbalance.methods import EpochContext
from mmbalance.methods.base import ModelInfo
from mmbalance.methods.baselines import MultiLoss, UniPreFinetuned
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit
from mmbalance.train.checkpoint import load_checkpoint


def test_train_start_gets_the_encoders_as_built_before_pretraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, dict[str, Tensor]] = {}

    def record(self: Any, ctx: EpochContext) -> None:
        seen["initial"] = {k: v.clone() for k, v in ctx.initial_encoder_state.items()}
        seen["current"] = {k: v.clone() for k, v in ctx.model.encoders.state_dict().items()}

    monkeypatch.setattr(UniPreFinetuned, "on_train_start", record)
    overrides = {**BASE, "method": "unipre_finetuned", "train.epochs": 1}
    cfg = resolve_config({**overrides, "train.unimodal_pretrain_epochs": 2})
    fit(cfg, tmp_path / "run")
    # the model fit builds, before pre-training: same seed, same construction
    make_fabric(cfg).seed_everything(cfg.train.seed, verbose=False)
    _, built, _ = build_components(cfg, build_dataset(cfg))
    pretrained = load_checkpoint(tmp_path / "run" / "pretrain" / "best.ckpt")["model"]
    assert seen["initial"].keys() == built.encoders.state_dict().keys()
    for key, value in built.encoders.state_dict().items():
        assert torch.equal(seen["initial"][key], value), key
        assert torch.equal(seen["current"][key], pretrained[f"encoders.{key}"]), key
    assert any(not torch.equal(seen["initial"][k], seen["current"][k]) for k in seen["initial"])


def test_without_pretraining_train_start_gets_the_encoders_it_starts_from(tmp_path: Path) -> None:
    class Records(MultiLoss):
        def on_train_start(self, ctx: EpochContext) -> None:
            self.initial = {k: v.clone() for k, v in ctx.initial_encoder_state.items()}
            self.current = {k: v.clone() for k, v in ctx.model.encoders.state_dict().items()}

    method = Records()
    make_trainer(method, tmp_path / "run", **{"train.epochs": 1}).run(resume=False)
    assert method.initial.keys() == method.current.keys()
    assert all(torch.equal(method.initial[k], method.current[k]) for k in method.initial)


class ReadsHeldOut(MultiLoss):
    @property
    def held_out_fraction(self) -> float:
        return 0.25

    def on_epoch_end(self, ctx: EpochContext) -> None:
        self.batches = list(ctx.batches("held_out"))
        self.features = ctx.features("held_out")
        with pytest.raises(ValueError, match="test"):
            next(iter(ctx.batches("test")))


def test_split_batches_hold_the_raw_inputs_of_a_training_split(tmp_path: Path) -> None:
    method = ReadsHeldOut()
    trainer = make_trainer(method, tmp_path / "run", **{"train.epochs": 1, "train.batch_size": 16})
    trainer.run(resume=False)
    index = torch.cat([b.index for b in method.batches])
    assert torch.equal(index, trainer.split_index["held_out"])
    assert torch.equal(index, method.features.index)
    train = trainer.data.splits["train"]
    for m in ("m1", "m2"):
        inputs = torch.cat([b.inputs[m] for b in method.batches])
        assert torch.equal(inputs, train.inputs[m][index])
    assert torch.equal(torch.cat([b.targets for b in method.batches]), train.targets[index])
    assert len(method.batches) == 2  # 60 held-out samples in batches of 2 * train.batch_size


class Rescaled(MultiLoss):
    """Predicts through a trainable scale of its own (like AMCo's output layer)."""

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        self.scale = nn.Linear(info.num_outputs, info.num_outputs)
        return self.scale

    def losses(self, output: ModelOutput, ctx: Any) -> dict[str, Tensor]:
        return {"task": ctx.task_loss(self.scale(output.logits))}

    def predict(self, output: ModelOutput) -> Tensor:
        return self.scale(output.logits)


def test_selected_checkpoint_holds_the_methods_module(tmp_path: Path) -> None:
    method = Rescaled()
    trainer = make_trainer(method, tmp_path / "run", **{"train.epochs": 2})
    trainer.run(resume=False)
    best = load_checkpoint(tmp_path / "run" / "best.ckpt")
    assert best["method_module"].keys() == method.scale.state_dict().keys()
    with torch.no_grad():
        method.scale.weight.add_(1.0)  # as if training had gone on
    trainer._finish()  # evaluates the selected epoch: model and method module restored together
    for key, value in best["method_module"].items():
        assert torch.equal(method.scale.state_dict()[key], value), key
