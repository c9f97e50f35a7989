"""AUG: the boosting loss and the assignment rule against their formulas, classifiers that join
the optimizer and train, checkpoints at every point of the growth (exact kill-and-resume, the
selected weights' layout), and learning on the competition preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARN, fit_killed_and_resumed, make_trainer, without_time

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, StepContext, build_method
from mmbalance.methods.aug import AUG, boosting_loss, classifier_to_add
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit
from mmbalance.train.checkpoint import load_checkpoint
from mmbalance.train.runner import evaluate_run


# --- the formulas ------------------------------------------------------------------------------
def test_boosting_loss_equals_the_formula_on_fixed_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    terms = [torch.randn(5, 4, generator=gen) for _ in range(3)]
    y = torch.tensor([0, 3, 1, 1, 2])
    lam = 0.5
    onehot = F.one_hot(y, 4).float()
    total, prev, last = terms[0] + terms[1] + terms[2], terms[0] + terms[1], terms[2]
    residual = onehot - lam * onehot * prev.softmax(-1)  # y - lambda y * softmax(prev)
    expected = (
        F.cross_entropy(total, y)
        + F.cross_entropy(prev, y)
        + (-(residual * last.log_softmax(-1)).sum(-1)).mean()
    )
    torch.testing.assert_close(boosting_loss(terms, y, lam), expected)
    # without added classifiers: the plain cross-entropy of the base classifier
    torch.testing.assert_close(boosting_loss(terms[:1], y, lam), F.cross_entropy(terms[0], y))


def test_the_residual_target_carries_no_gradient_into_the_earlier_classifiers() -> None:
    prev = torch.randn(4, 3, requires_grad=True)
    last = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    boosting_loss([prev, last], y, 0.5).backward()
    # d/d prev comes from CE(prev + last) and CE(prev) only: the residual target is a constant
    expected = torch.autograd.grad(
        F.cross_entropy(prev + last, y) + F.cross_entropy(prev, y), prev
    )[0]
    torch.testing.assert_close(prev.grad, expected)


def test_assignment_rule_goes_to_the_weakest_beyond_the_margin() -> None:
    # two modalities: audio leads by more than 1 + 0.01 -> video gets a classifier
    assert classifier_to_add({"a": 102.0, "v": 100.0}, 1.0, 0.01) == "v"
    assert classifier_to_add({"a": 100.5, "v": 100.0}, 1.0, 0.01) is None  # within the margin
    assert classifier_to_add({"a": 90.0, "v": 100.0}, 1.0, 0.01) == "a"
    assert classifier_to_add({"a": 50.0, "v": 50.0}, 1.0, 0.01) is None
    # three modalities: the weakest against the mean of the others, (60 + 80) / 2 / 60 = 1.17
    assert classifier_to_add({"a": 60.0, "b": 80.0, "c": 60.5}, 1.0, 0.01) == "a"
    assert classifier_to_add({"a": 60.0, "b": 80.0, "c": 60.5}, 1.2, 0.01) is None


def test_prediction_is_the_weighted_sum_of_each_modalitys_classifiers() -> None:
    info = ModelInfo(("a", "b"), {"a": 3, "b": 5}, 4)
    method = AUG(modality_weights=[0.4, 0.6], hidden_dim=6)
    head = method.setup(info)
    head.add("b")
    z = {"a": torch.randn(7, 3), "b": torch.randn(7, 5)}
    out_a = head.out(F.relu(head.base["a"](z["a"])))
    out_b = head.out(F.relu(head.base["b"](z["b"]))) + head.out(F.relu(head.added["b"][0](z["b"])))
    prediction = method.predict(ModelOutput(torch.zeros(7, 4), z))
    torch.testing.assert_close(prediction, 0.4 * out_a + 0.6 * out_b)


def test_a_missing_modality_leaves_its_classifiers_out() -> None:
    info = ModelInfo(("a", "b"), {"a": 3, "b": 5}, 4)
    method = AUG(modality_weights=[0.4, 0.6], hidden_dim=6)
    head = method.setup(info)
    z = {"a": torch.randn(3, 3), "b": torch.randn(3, 5)}
    out_a = head.out(F.relu(head.base["a"](z["a"])))
    out_b = head.out(F.relu(head.base["b"](z["b"])))
    missing = {"b": torch.tensor([True, False, True])}
    prediction = method.predict_missing(lambda lat: ModelOutput(torch.zeros(3, 4), lat), z, missing)
    expected = 0.4 * out_a + 0.6 * out_b * (~missing["b"]).unsqueeze(1)
    torch.testing.assert_close(prediction, expected)


def test_bad_settings_are_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="modality_weights"):
        AUG(modality_weights=[1.0]).setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 4))
    with pytest.raises(ConfigError, match="classification"):
        AUG().setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 1, task="regression"))
    with pytest.raises(ConfigError, match="never act"):
        resolve_config({**LEARN, "method": "aug", "train.epochs": 1})
    with pytest.raises(ConfigError, match="residual_weight"):
        build_method("aug", {"residual_weight": 2.0})


def test_a_growing_module_is_refused_under_several_processes(tmp_path: Path) -> None:
    from mmbalance.train import Trainer

    class TwoProcesses:
        world_size = 2

    with pytest.raises(ConfigError, match="adds parameters while it trains"):
        Trainer(TwoProcesses(), None, None, None, AUG(), None, tmp_path)  # type: ignore[arg-type]


# --- growth -------------------------------------------------------------------------------------
def test_added_classifiers_join_the_optimizer_and_train(tmp_path: Path) -> None:
    method = AUG()
    over = {"dataset.preset": "competition", "train.epochs": 2}
    trainer = make_trainer(method, tmp_path / "run", **over)
    snapshots: dict[str, Any] = {}
    original = method.on_epoch_end

    def record(ctx: EpochContext) -> None:
        original(ctx)
        if ctx.epoch == 0:  # the classifier added after epoch 0, as initialised
            snapshots.update(
                {
                    m: [p.detach().clone() for p in layers.parameters()]
                    for m, layers in method.head.added.items()
                }
            )

    method.on_epoch_end = record  # type: ignore[method-assign]
    trainer.run(resume=False)
    added = [(m, i) for m, layers in snapshots.items() for i in range(len(layers) // 2)]
    assert added, "the competition preset's weak modality gets a classifier after epoch 0"
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for m, i in added:
        layer = method.head.added[m][i]
        assert all(id(p) in optimised for p in layer.parameters())
        # it trained in epoch 1 (the official code leaves it at its initialisation)
        assert not torch.equal(layer.weight.detach(), snapshots[m][2 * i])


def test_layouts_round_trip_and_refuse_another_model() -> None:
    method = AUG(hidden_dim=4)
    head = method.setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 2))
    head.add("a")
    head.add("a")
    layout = method.module_layout()
    assert layout == {"added": {"a": 2, "b": 0}}
    other = AUG(hidden_dim=4)
    other_head = other.setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 2))
    other.restore_module_layout(layout)
    other_head.load_state_dict(head.state_dict())  # the same parameters, loadable
    other.restore_module_layout({"added": {"a": 1, "b": 0}})  # shrinks
    assert other.module_layout() == {"added": {"a": 1, "b": 0}}
    with pytest.raises(ValueError, match="modalities"):
        other.restore_module_layout({"added": {"x": 1}})


# --- runs ----------------------------------------------------------------------------------------
CONFIG: dict[str, Any] = {**LEARN, "method": "aug"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("aug") / "reference"
    return out, fit(resolve_config(CONFIG), out)


def test_aug_learns_the_competition_preset(reference: tuple[Path, Any]) -> None:
    _, result = reference
    assert result.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    counts = [r["method_classifiers_m2"] for r in result.history]
    assert counts[-1] > 1  # the weak modality got classifiers


@pytest.mark.parametrize("after_epoch", [0, 1])
def test_a_run_killed_at_any_point_of_the_growth_resumes_exactly(
    reference: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_epoch: int
) -> None:
    out, result = reference
    resumed = fit_killed_and_resumed(
        resolve_config(CONFIG), tmp_path / "killed", monkeypatch, after_epoch
    )
    assert without_time(resumed.history) == without_time(result.history)
    assert resumed.metrics == result.metrics
    a = load_checkpoint(out / "last.ckpt")
    b = load_checkpoint(tmp_path / "killed" / "last.ckpt")
    assert a["method_layout"] == b["method_layout"]
    assert a["module"].keys() == b["module"].keys()
    for key in a["module"]:
        assert torch.equal(a["module"][key], b["module"][key]), key


def test_the_selected_weights_are_evaluated_with_their_own_classifiers(
    reference: tuple[Path, Any],
) -> None:
    out, result = reference
    best = load_checkpoint(out / "best.ckpt")
    last = load_checkpoint(out / "last.ckpt")
    # this run selects epoch 1, which had fewer classifiers than the end of the run
    assert best["method_layout"]["added"]["m2"] < last["method_layout"]["added"]["m2"]
    # evaluate rebuilds the selected weights' layout and scores them as the run did
    metrics = evaluate_run(out)
    for split in ("val", "test"):
        for key, value in metrics[split].items():
            assert value == pytest.approx(result.metrics[split][key]), (split, key)


def test_steps_alternate_modalities_through_the_shared_output_layer() -> None:
    info = ModelInfo(("a", "b"), {"a": 3, "b": 3}, 2)
    method = AUG(hidden_dim=4)
    method.setup(info)
    ctx = StepContext.standalone(torch.tensor([0, 1]))
    assert list(method.step_parts(ctx)) == ["a", "b"]
