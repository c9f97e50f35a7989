"""UMT: the distillation term against the formula (M = 2 and 3), teachers taken from the
pre-trained encoders and frozen, students restarted from the encoders as built, kill-and-resume
exactness with the teachers restored, and learning."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPETITION_400

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, StepContext, build_method
from mmbalance.methods.umt import UMT, feature_distillation
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import fit
from mmbalance.train.checkpoint import load_checkpoint


def _model(m: int, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    names = ["a", "b", "c"][:m]
    encoders = {n: MLPEncoder((5 + i,), hidden=[8], out_dim=4 + i) for i, n in enumerate(names)}
    fusion = LateSumFusion({n: e.out_dim for n, e in encoders.items()}, 3)
    return MultimodalModel(encoders, fusion)


def _inputs(m: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {n: torch.randn(6, 5 + i, generator=gen) for i, n in enumerate(["a", "b", "c"][:m])}


@pytest.mark.parametrize("m", [2, 3])
def test_distillation_term_equals_the_formula(m: int) -> None:
    model = _model(m)
    built = {k: v.clone() for k, v in model.encoders.state_dict().items()}
    with torch.no_grad():  # stand-in for unimodal pre-training
        for p in model.encoders.parameters():
            p.add_(0.3 * torch.randn_like(p))
    pretrained = copy.deepcopy(model.encoders)
    method = build_method("umt", {"lam": 2.5})
    method.on_train_start(EpochContext.standalone(0, model=model, initial_encoder_state=built))
    # the students restart from the encoders as built
    for k, v in model.encoders.state_dict().items():
        assert torch.equal(v, built[k]), k
    inputs, y = _inputs(m), torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = StepContext.standalone(y, inputs=inputs, fusion=model.fusion)
    latents = method.encode(model, inputs, ctx)
    terms = method.losses(model.heads(latents), ctx)
    expected = sum(
        ((model.encoders[n](x) - pretrained[n](x)) ** 2).mean() for n, x in inputs.items()
    )
    torch.testing.assert_close(terms["distill"], 2.5 * expected)
    torch.testing.assert_close(terms["task"], F.cross_entropy(model(inputs).logits, y))
    assert float(expected.detach()) > 0


def test_feature_distillation_is_a_sum_of_mean_squared_errors() -> None:
    f = {"a": torch.tensor([[1.0, 2.0], [0.0, 0.0]]), "b": torch.tensor([[3.0], [1.0]])}
    t = {"a": torch.tensor([[0.0, 2.0], [0.0, 2.0]]), "b": torch.tensor([[1.0], [1.0]])}
    # a: (1 + 0 + 0 + 4) / 4 = 1.25; b: (4 + 0) / 2 = 2
    assert float(feature_distillation(f, t)) == pytest.approx(3.25)


def test_teachers_are_frozen_in_eval_mode_and_get_no_gradient() -> None:
    model = _model(2)
    method = UMT(student_init="pretrained")
    method.on_train_start(EpochContext.standalone(0, model=model))
    inputs, y = _inputs(2), torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()
    ctx = StepContext.standalone(y, inputs=inputs, fusion=model.fusion)
    with torch.no_grad():
        for p in model.encoders.parameters():  # the students move away from the teachers
            p.add_(0.1)
    terms = method.losses(model.heads(method.encode(model, inputs, ctx)), ctx)
    sum(terms.values()).backward()
    teachers = method.teachers(model)
    for teacher in teachers.values():
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in model.encoders.parameters())
    # the teachers are not part of the model: the optimizer of the model cannot reach them
    own = {id(p) for p in model.parameters()}
    assert all(id(p) not in own for t in teachers.values() for p in t.parameters())


def test_scratch_students_need_the_encoders_as_built() -> None:
    with pytest.raises(RuntimeError, match="initial_encoder_state"):
        UMT().on_train_start(EpochContext.standalone(0, model=_model(2)))
    with pytest.raises(ConfigError, match="student_init"):
        build_method("umt", {"student_init": "teacher"})
    with pytest.raises(ConfigError, match="lam"):
        build_method("umt", {"lam": -1.0})


BASE: dict[str, Any] = {
    **COMPETITION_400,
    "method": "umt",
    "train.epochs": 4,
    "train.unimodal_pretrain_epochs": 3,
}


def test_teachers_are_the_pretrained_encoders(tmp_path: Path) -> None:
    """The teachers are the unimodally pre-trained encoders, frozen all along (resuming a killed
    run, teachers included, is the method contract's)."""
    fit(resolve_config(BASE), tmp_path / "reference")
    pretrained = load_checkpoint(tmp_path / "reference" / "pretrain" / "best.ckpt")["model"]
    teachers = load_checkpoint(tmp_path / "reference" / "last.ckpt")["method"]["teachers"]
    for m, state in teachers.items():
        for k, v in state.items():
            assert torch.equal(v, pretrained[f"encoders.{m}.{k}"]), (m, k)


def test_umt_learns_the_competition_task(tmp_path: Path) -> None:
    result = fit(resolve_config({**BASE, "train.epochs": 6}), tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    # the distillation pulls the students towards the teachers
    assert result.history[-1]["train_distill"] < result.history[0]["train_distill"]
