"""Tests of MSLR: learning-rate factors from validation accuracies (hand-made epoch contexts and
the real trainer), the probes' gradients, resume and a learning test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARN

from mmbalance.build import build_dataset, build_model, make_fabric, model_info, resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, StepContext, build_method
from mmbalance.methods.mslr import sliding_ratio
from mmbalance.train import Trainer, fit

INFO = ModelInfo(("m1", "m2"), {"m1": 4, "m2": 4}, 5)


def _end_epoch(method, epoch: int, acc1: float, acc2: float) -> None:
    metrics = {"accuracy": 0.5, "unimodal_accuracy_m1": acc1, "unimodal_accuracy_m2": acc2}
    method.on_epoch_end(EpochContext.standalone(epoch, val_metrics=metrics))


def test_sliding_ratio_is_the_last_accuracy_over_the_mean_of_the_k_before() -> None:
    assert sliding_ratio(0.6, [0.5], 2) == 1.0  # fewer than K earlier accuracies
    assert sliding_ratio(0.6, [0.4, 0.5, 0.7], 2) == pytest.approx(0.6 / 0.6)
    assert sliding_ratio(0.9, [0.2, 0.4, 0.5], 3) == pytest.approx(0.9 / (1.1 / 3))
    assert sliding_ratio(0.3, [0.0, 0.0], 2) == 1.0  # no division by a zero mean


def test_hand_made_epochs_give_the_stated_learning_rate_factors() -> None:
    method = build_method("mslr", {"window": 2, "init_scales": {"m1": 0.7, "m2": 1.3}})
    method.setup(INFO)
    assert method.lr_scales() == {"encoder.m1": 0.7, "encoder.m2": 1.3}  # before any epoch
    accuracies = [(0.5, 0.2), (0.6, 0.3), (0.66, 0.25), (0.6, 0.5)]
    for epoch, (a1, a2) in enumerate(accuracies):
        _end_epoch(method, epoch, a1, a2)
        scales = method.lr_scales()
        if epoch < 2:  # fewer than K = 2 earlier epochs: rho = 1
            expected = {"encoder.m1": 0.7, "encoder.m2": 1.3}
        else:
            prev1 = [a[0] for a in accuracies[epoch - 2 : epoch]]
            prev2 = [a[1] for a in accuracies[epoch - 2 : epoch]]
            expected = {
                "encoder.m1": 0.7 * a1 / (sum(prev1) / 2),
                "encoder.m2": 1.3 * a2 / (sum(prev2) / 2),
            }
        assert scales == pytest.approx(expected), epoch
    # epoch 3: m1 0.6 / mean(0.6, 0.66), m2 0.5 / mean(0.3, 0.25): m2 improves, m1 stalls
    assert scales["encoder.m1"] < 0.7 and scales["encoder.m2"] > 1.3


def test_three_modalities_each_get_their_own_ratio() -> None:
    info = ModelInfo(("a", "b", "c"), {"a": 2, "b": 2, "c": 2}, 3)
    method = build_method("mslr", {"window": 1, "init_scales": {"c": 0.5}})
    method.setup(info)
    history = [{"a": 0.4, "b": 0.5, "c": 0.2}, {"a": 0.5, "b": 0.4, "c": 0.3}]
    for epoch, accs in enumerate(history):
        metrics = {f"unimodal_accuracy_{m}": v for m, v in accs.items()}
        method.on_epoch_end(EpochContext.standalone(epoch, val_metrics=metrics))
    expected = {"encoder.a": 0.5 / 0.4, "encoder.b": 0.4 / 0.5, "encoder.c": 0.5 * 0.3 / 0.2}
    assert method.lr_scales() == pytest.approx(expected)


def test_fixed_strategy_keeps_the_initial_factors() -> None:
    method = build_method("mslr", {"strategy": "fixed", "window": 1, "init_scales": {"m2": 2.0}})
    method.setup(INFO)
    for epoch, accs in enumerate([(0.1, 0.9), (0.9, 0.1), (0.5, 0.5)]):
        _end_epoch(method, epoch, *accs)
        assert method.lr_scales() == {"encoder.m1": 1.0, "encoder.m2": 2.0}


def test_missing_validation_metric_and_bad_options_are_errors() -> None:
    method = build_method("mslr", {})
    method.setup(INFO)
    with pytest.raises(ConfigError, match="unimodal_accuracy_m1"):
        method.on_epoch_end(EpochContext.standalone(0, val_metrics={"accuracy": 0.5}))
    with pytest.raises(ConfigError, match="init_scales"):
        build_method("mslr", {"init_scales": {"m1": -1}})
    with pytest.raises(ConfigError, match="window"):
        build_method("mslr", {"window": 0})
    with pytest.raises(ConfigError, match="lacks"):
        build_method("mslr", {"init_scales": {"audio": 0.5}}).setup(INFO)


def test_trainer_sets_each_epochs_rates_from_the_previous_validation_accuracies(
    tmp_path: Path,
) -> None:
    init = {"m1": 0.5, "m2": 1.5}
    cfg = resolve_config(
        {
            **LEARN,
            "method": "mslr",
            "method.window": 2,
            "method.init_scales": init,
            "train.epochs": 5,
            "train.lr": 0.01,
        }
    )
    fabric = make_fabric(cfg)
    fabric.seed_everything(cfg.train.seed, verbose=False)
    data = build_dataset(cfg)
    method = build_method("mslr", cfg.method.params)
    model = build_model(cfg, data, method)
    trainer = Trainer(
        fabric, cfg, data, model, method, method.setup(model_info(model, data)), tmp_path
    )
    trainer.run(resume=False)
    rows = trainer.history
    for epoch, row in enumerate(rows):
        for m in ("m1", "m2"):
            accs = [r[f"val_unimodal_accuracy_{m}"] for r in rows[:epoch]]
            rho = accs[-1] / (sum(accs[-3:-1]) / 2) if epoch >= 3 else 1.0
            assert row[f"lr_scale_encoder.{m}"] == pytest.approx(init[m] * rho), (epoch, m)
    # the optimizer's groups hold the last epoch's rates; the other groups the base rate
    rates = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    for m in ("m1", "m2"):
        assert rates[f"encoder.{m}"] == pytest.approx(0.01 * rows[-1][f"lr_scale_encoder.{m}"])
        assert rates[f"unimodal_head.{m}"] == pytest.approx(0.01)
    assert rates["fusion"] == pytest.approx(0.01)
    assert any(rows[-1][f"lr_scale_encoder.{m}"] != init[m] for m in ("m1", "m2"))


def test_encoders_get_the_fused_gradient_only_and_heads_learn_as_probes() -> None:
    cfg = resolve_config({**LEARN, "method": "mslr", "method.window": 1})
    data = build_dataset(cfg)
    method = build_method("mslr", {})
    model = build_model(cfg, data, method)
    method.setup(model_info(model, data))
    batch = data.splits["train"].__getitems__(list(range(32)))
    inputs, y = batch.inputs, batch.targets
    ctx = StepContext.standalone(y, fusion=model.fusion, encoder_params=model.encoder_parameters())
    output = model.heads(method.encode(model, inputs, ctx))
    losses = method.losses(output, ctx)
    method.backward(losses, ctx)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs).logits, y).backward()
    for name, p in model.named_parameters():
        if name.startswith(("encoders.", "fusion.")):
            torch.testing.assert_close(grads[name], p.grad, msg=name)
        else:  # unimodal heads: trained by their own loss on detached latents
            assert p.grad is None and grads[name].abs().sum() > 0, name
    assert set(losses) == {"task", "uni_m1", "uni_m2"}


def test_mslr_learns_the_competition_preset(tmp_path: Path) -> None:
    result = fit(resolve_config({**LEARN, "method": "mslr", "method.window": 1}), tmp_path / "mslr")
    assert result.metrics["test"]["accuracy"] >= 0.8  # chance is 0.2 (5 classes)
