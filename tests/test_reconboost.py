"""ReconBoost: the shared boosted head, the reconcilement and consolidation terms against their
formulas, the stage schedule for any number of modalities, what trains in each phase, exact
resume mid-stage, and learning on the competition preset."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SCHEDULED_LEARN, build_trainer
from torch import nn

from mmbalance.build import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import ModelInfo, StepContext, build_method
from mmbalance.methods.reconboost import ReconBoost, consolidation_loss, reconcile_loss
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.shared_head import SharedBoostHead
from mmbalance.train import Trainer
from mmbalance.train.checkpoint import load_checkpoint

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 160,
    "dataset.n_val": 80,
    "dataset.n_test": 100,
    "dataset.n_bayes": 500,
    "method": "reconboost",
    "train.batch_size": 32,
    "train.progress": False,
    "train.tensorboard": False,
    "train.epoch_analysis": False,
}


# --- the head ------------------------------------------------------------------------------------
def test_shared_head_is_beta_times_the_sum_of_one_shared_mlp() -> None:
    torch.manual_seed(0)
    head = SharedBoostHead({"a": 6, "b": 6, "c": 6}, 4, hidden=5, boost_rate=1.0)
    with torch.no_grad():
        head.boost_rate.fill_(0.7)
    z = {m: torch.randn(3, 6) for m in ("a", "b", "c")}
    out = head(z)
    lin1, lin2 = head.shared[0], head.shared[2]
    own = {
        m: torch.relu(v @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
        for m, v in z.items()
    }
    torch.testing.assert_close(out.logits, 0.7 * (own["a"] + own["b"] + own["c"]))
    for m in z:
        torch.testing.assert_close(out.contributions[m], 0.7 * own[m])
        torch.testing.assert_close(head.learner_logits({m: z[m]})[m], own[m])
    assert head.additive and head.bias is None
    with pytest.raises(ConfigError, match="equal latent sizes"):
        SharedBoostHead({"a": 6, "b": 5}, 4)


# --- the loss terms ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 5])
def test_reconcile_gradient_equals_the_formula(num_classes: int) -> None:
    torch.manual_seed(1)
    b, w1, w2 = 7, 5.0, 1.0
    learner = torch.randn(b, num_classes, requires_grad=True)
    ensemble = torch.randn(b, num_classes, requires_grad=True)
    y = torch.randint(0, num_classes, (b,))
    loss = reconcile_loss(learner, ensemble, y, w1, w2)
    loss.backward()
    # the formula: l_i = -(1/C) (w1 - w2 q_i) log p_i[y_i], q = softmax(ensemble)[y]; the mean
    # over the batch; d l_i / d z_i = -(1/C) (w1 - w2 q_i) (onehot_i - p_i)
    with torch.no_grad():
        onehot = F.one_hot(y, num_classes).double()
        p = learner.double().softmax(-1)
        q = (ensemble.double().softmax(-1) * onehot).sum(-1)
        weight = w1 - w2 * q
        value = (-weight * (p * onehot).sum(-1).log()).mean() / num_classes
        grad = -(weight[:, None] * (onehot - p)) / (num_classes * b)
    torch.testing.assert_close(loss.double(), value)
    torch.testing.assert_close(learner.grad.double(), grad)
    assert ensemble.grad is None  # no gradient to the other learners


def test_consolidation_option_changes_the_gradient() -> None:
    torch.manual_seed(2)
    learner = torch.randn(6, 4, requires_grad=True)
    previous = torch.randn(6, 4, requires_grad=True)
    paper = consolidation_loss(learner, previous, inert=False)
    (g_paper,) = torch.autograd.grad(paper, learner)
    with torch.no_grad():
        diff = learner.softmax(-1) - previous.softmax(-1)
        # d/dz MSE(softmax(z), s) = J_softmax^T (2 diff / numel)
        p = learner.softmax(-1)
        upstream = 2 * diff / diff.numel()
        expected = p * (upstream - (upstream * p).sum(-1, keepdim=True))
    torch.testing.assert_close(g_paper, expected)
    official = consolidation_loss(learner, previous, inert=True)
    assert not official.requires_grad  # the official term is a constant
    torch.testing.assert_close(official, paper.detach())
    assert g_paper.abs().sum() > 0


# --- through the method --------------------------------------------------------------------------
def _model(modalities: tuple[str, ...], d: int = 5, classes: int = 4) -> MultimodalModel:
    torch.manual_seed(3)
    encoders = {m: nn.Sequential(nn.Linear(3, d), nn.Tanh()) for m in modalities}
    head = SharedBoostHead(dict.fromkeys(modalities, d), classes, hidden=8, boost_rate=1.3)
    return MultimodalModel(encoders, head)


def _method(modalities: tuple[str, ...], **options: Any) -> ReconBoost:
    method = ReconBoost(**{"epochs_per_stage": 2, "correct_epochs": 1, **options})
    method.setup(ModelInfo(modalities, dict.fromkeys(modalities, 5), 4))
    return method


def _step_grads(
    method: ReconBoost, model: MultimodalModel, epoch: int, inputs: dict, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ctx = StepContext.standalone(y, fusion=model.fusion, epoch=epoch)
    latents = method.encode(model, inputs, ctx)
    losses = method.losses(model.heads(latents), ctx)
    method.backward(losses, ctx)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("modalities", [("a", "b"), ("a", "b", "c")])
def test_learner_step_gradient_equals_the_formula(modalities: tuple[str, ...]) -> None:
    """Stage 1 (epoch 3 with 2 + 1 epochs per stage): learner ``modalities[1]``, consolidation
    against ``modalities[0]``. The gradient of every parameter equals the gradient of the loss
    written here from the formula, and only the learner's encoder and the shared head get one."""
    model = _model(modalities)
    method = _method(modalities, weight1=4.0, weight2=1.5, alpha=0.7)
    torch.manual_seed(4)
    inputs = {m: torch.randn(9, 3) for m in modalities}
    y = torch.randint(0, 4, (9,))
    assert method.stage(3) == (1, modalities[1])
    grads = _step_grads(method, model, 3, inputs, y)
    assert set(grads) == {
        *(f"encoders.{modalities[1]}.0.{k}" for k in ("weight", "bias")),
        *(f"fusion.shared.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")),
    }  # not the other encoders, not the boost rate

    head, learner, prev = model.fusion, modalities[1], modalities[0]
    model.zero_grad(set_to_none=True)
    own = head.shared(model.encoders[learner](inputs[learner]))
    with torch.no_grad():
        beta = head.boost_rate
        ens = sum(
            beta * head.shared(model.encoders[m](inputs[m])) for m in modalities if m != learner
        )
        q = ens.softmax(-1)[torch.arange(9), y]
        prev_p = head.shared(model.encoders[prev](inputs[prev])).softmax(-1)
    log_p = own.log_softmax(-1)[torch.arange(9), y]
    reference = (-(4.0 - 1.5 * q) * log_p).mean() / 4 + 0.7 * (
        (own.softmax(-1) - prev_p) ** 2
    ).mean()
    reference.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_official_consolidation_gives_the_reconcile_gradient_only() -> None:
    modalities = ("a", "b")
    torch.manual_seed(5)
    inputs = {m: torch.randn(9, 3) for m in modalities}
    y = torch.randint(0, 4, (9,))
    runs = {}
    for option, alpha in (("paper", 0.7), ("official", 0.7), ("paper", 0.0)):
        model = _model(modalities)
        runs[option, alpha] = _step_grads(
            _method(modalities, alpha=alpha, consolidation=option), model, 3, inputs, y
        )
    name = "encoders.b.0.weight"
    torch.testing.assert_close(runs["official", 0.7][name], runs["paper", 0.0][name])
    assert not torch.allclose(runs["paper", 0.7][name], runs["official", 0.7][name])


def test_stage_zero_has_no_consolidation_and_rectification_is_the_fused_loss() -> None:
    modalities = ("a", "b")
    model = _model(modalities)
    method = _method(modalities)
    torch.manual_seed(6)
    inputs = {m: torch.randn(9, 3) for m in modalities}
    y = torch.randint(0, 4, (9,))
    ctx = StepContext.standalone(y, fusion=model.fusion, epoch=0)
    assert set(method.losses(model.heads(method.encode(model, inputs, ctx)), ctx)) == {"reconcile"}
    ctx = StepContext.standalone(y, fusion=model.fusion, epoch=2)  # rectification of stage 0
    losses = method.losses(model.heads(method.encode(model, inputs, ctx)), ctx)
    torch.testing.assert_close(losses["task"], F.cross_entropy(model(inputs).logits, y))


def test_phases_cycle_through_any_number_of_modalities() -> None:
    method = _method(("a", "b", "c"))  # 2 learner epochs + 1 rectification epoch per stage
    seen = [method.phase(e) for e in range(10)]
    assert [p.name for p in seen] == [
        "stage0.learner.a",
        "stage0.learner.a",
        "stage0.rectification",
        "stage1.learner.b",
        "stage1.learner.b",
        "stage1.rectification",
        "stage2.learner.c",
        "stage2.learner.c",
        "stage2.rectification",
        "stage3.learner.a",
    ]
    assert seen[0].trainable == {"encoder.a", "fusion"}
    assert seen[6].trainable == {"encoder.c", "fusion"}
    assert seen[2].trainable is None and all(p.reset_optimizer for p in seen)
    no_rect = _method(("a", "b"), correct_epochs=0)
    assert [no_rect.phase(e).name for e in range(5)] == [
        "stage0.learner.a",
        "stage0.learner.a",
        "stage1.learner.b",
        "stage1.learner.b",
        "stage2.learner.a",
    ]


def test_options_are_checked_and_the_head_is_required() -> None:
    with pytest.raises(ConfigError, match="epochs_per_stage"):
        build_method("reconboost", {"epochs_per_stage": 0})
    with pytest.raises(ConfigError, match="weight1"):
        build_method("reconboost", {"weight1": 0.5, "weight2": 1.0})
    with pytest.raises(ConfigError, match="shared_boost"):
        resolve_config({**SMALL, "fusion": "late_sum"})
    assert resolve_config(SMALL).fusion.name == "shared_boost"


# --- through the trainer -------------------------------------------------------------------------
def _trainer(out: Path, **overrides: Any) -> Trainer:
    return build_trainer(resolve_config({**SMALL, **overrides}), out)


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix))


def test_what_trains_in_each_phase(tmp_path: Path) -> None:
    """One epoch per phase: learner m1, rectification, learner m2, read after each epoch from the
    checkpoint the trainer writes."""
    opts = {"method.epochs_per_stage": 1, "method.correct_epochs": 1, "train.optimizer": "sgd"}
    states = [_snapshot(_trainer(tmp_path / "run", **opts, **{"train.epochs": 1}))]
    for epochs in (1, 2, 3):
        trainer = _trainer(tmp_path / "run", **opts, **{"train.epochs": epochs})
        trainer.run(resume=epochs > 1)
        module = load_checkpoint(tmp_path / "run" / "last.ckpt")["module"]
        states.append(
            {n.removeprefix("model."): v for n, v in module.items() if n.startswith("model.")}
        )
    learner1, rect, learner2 = itertools.pairwise(states)
    assert _changed(*learner1, "encoders.m1") and not _changed(*learner1, "encoders.m2")
    assert _changed(*learner1, "fusion.shared")
    assert not _changed(*learner1, "fusion.boost_rate")
    assert _changed(*rect, "encoders.m1") and _changed(*rect, "encoders.m2")
    assert _changed(*rect, "fusion.boost_rate")  # the boost rate trains in rectification
    assert _changed(*learner2, "encoders.m2") and not _changed(*learner2, "encoders.m1")
    assert not _changed(*learner2, "fusion.boost_rate")


def test_reconboost_learns_the_competition_preset(competition_metrics) -> None:
    """Well above chance (5 classes: 0.2) after three short stages."""
    metrics = competition_metrics(
        {
            "method": "reconboost",
            **SCHEDULED_LEARN,
            "method.epochs_per_stage": 2,
            "method.correct_epochs": 1,
        },
        seeds=(0,),
    )
    assert metrics["accuracy"] > 0.7, metrics
