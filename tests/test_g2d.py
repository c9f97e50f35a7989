"""G2D: the distillation terms against their formulas, sequential modality prioritisation (the
most confident teacher's encoder frozen, ties, the window, which tensors), teachers taken from
the pre-trained encoders and heads with the students restarted, learning and an exact
kill-and-resume with the teachers restored."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPETITION_400, fit_killed_and_resumed, without_time

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, StepContext, build_method, total_loss
from mmbalance.methods.g2d import G2D, frozen_modality, logit_distillation
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import fit
from mmbalance.train.checkpoint import load_checkpoint


def _model(m: int, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    names = ["a", "b", "c"][:m]
    encoders = {n: MLPEncoder((5 + i,), hidden=[8], out_dim=4) for i, n in enumerate(names)}
    return MultimodalModel(encoders, LateSumFusion({n: 4 for n in names}, 3), unimodal_heads=True)


def _inputs(m: int, n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(n, 5 + i, generator=gen) for i, k in enumerate(["a", "b", "c"][:m])}


def _started(model: MultimodalModel, **options: Any) -> tuple[G2D, MultimodalModel, dict]:
    """A G2D whose teachers are ``model``'s current encoders and heads (as after pre-training),
    with the students restarted from other weights."""
    built = {
        k: v.clone() for k, v in _model(len(model.modalities), seed=9).encoders.state_dict().items()
    }
    pretrained = copy.deepcopy(model)
    method = G2D(**options)
    method.setup(ModelInfo(model.modalities, dict(model.fusion.latent_dims), 3))
    method.on_train_start(EpochContext.standalone(0, model=model, initial_encoder_state=built))
    return method, pretrained, built


def test_logit_distillation_is_the_batch_mean_kl_times_t_squared() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    for temperature in (1.0, 2.0):
        q = (t / temperature).softmax(-1)
        p = (s / temperature).softmax(-1)
        expected = (q * (q.log() - p.log())).sum(-1).mean() * temperature**2
        torch.testing.assert_close(logit_distillation(s, t, temperature), expected)


@pytest.mark.parametrize("m", [2, 3])
def test_loss_terms_equal_the_formula(m: int) -> None:
    model = _model(m)
    method, teacher, built = _started(model, logit_distill_weight=0.7, feature_distill_weight=2.0)
    for k, v in model.encoders.state_dict().items():  # the students restart
        assert torch.equal(v, built[k]), k
    inputs, y = _inputs(m), torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = StepContext.standalone(y, inputs=inputs, encoder_params=model.encoder_parameters())
    output = model.heads(method.encode(model, inputs, ctx))
    terms = method.losses(output, ctx)
    logit = sum(
        logit_distillation(output.logits, teacher.unimodal_heads[n](teacher.encoders[n](x)), 1.0)
        for n, x in inputs.items()
    )
    feature = sum(
        F.mse_loss(model.encoders[n](x), teacher.encoders[n](x)) for n, x in inputs.items()
    )
    torch.testing.assert_close(terms["task"], F.cross_entropy(output.logits, y))
    torch.testing.assert_close(terms["logit_distill"], 0.7 * logit)
    torch.testing.assert_close(terms["feature_distill"], 2.0 * feature)
    # the students' heads were reset and train as probes on detached latents
    for n in inputs:
        assert not torch.equal(model.unimodal_heads[n].weight, teacher.unimodal_heads[n].weight)


def _lead(model: MultimodalModel, leader: str) -> None:
    """Every target is class 0; the leader's (future teacher's) head says class 0 loudly."""
    with torch.no_grad():
        for n, head in model.unimodal_heads.items():
            head.weight.mul_(0.01)
            head.bias.copy_(torch.tensor([4.0, 0.0, 0.0]) if n == leader else torch.zeros(3))


@pytest.mark.parametrize(("m", "leader", "freeze"), [(2, "a", "weights"), (3, "c", "all")])
def test_the_most_confident_teachers_encoder_is_frozen(m: int, leader: str, freeze: str) -> None:
    model = _model(m)
    _lead(model, leader)
    method, _, _ = _started(model, freeze=freeze)
    inputs, y = _inputs(m), torch.zeros(6, dtype=torch.long)
    ctx = StepContext.standalone(y, inputs=inputs, encoder_params=model.encoder_parameters())
    model.zero_grad(set_to_none=True)
    total_loss(method.losses(model.heads(method.encode(model, inputs, ctx)), ctx)).backward()
    raw = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    method.rewrite_gradients(ctx)
    assert ctx.logs[f"frozen_{leader}"] == 1.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        frozen = name.startswith(f"encoders.{leader}.") and (freeze == "all" or p.dim() >= 2)
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if frozen else raw[name])
        if name.startswith(f"encoders.{leader}.") and not frozen:
            assert raw[name].abs().sum() > 0  # a bias of the frozen encoder keeps training


def test_ties_and_the_window_freeze_nothing() -> None:
    assert frozen_modality(torch.tensor([2.0, 2.0])) is None
    assert frozen_modality(torch.tensor([1.0, 3.0, 3.0])) is None
    assert frozen_modality(torch.tensor([1.0, 3.0, 2.0])) == 1
    model = _model(2)
    _lead(model, "a")
    method, _, _ = _started(model, start_epoch=2, end_epoch=3)
    inputs, y = _inputs(2), torch.zeros(6, dtype=torch.long)
    for epoch, frozen in [(1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0)]:
        ctx = StepContext.standalone(y, inputs=inputs, epoch=epoch)
        method.losses(model.heads(method.encode(model, inputs, ctx)), ctx)
        assert ctx.logs["frozen_a"] == frozen, epoch


def test_bad_settings_are_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="classification"):
        G2D().setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 1, task="regression"))
    with pytest.raises(ConfigError, match="end_epoch"):
        build_method("g2d", {"start_epoch": 3, "end_epoch": 1})
    with pytest.raises(ConfigError, match="never act"):
        resolve_config(
            {**COMPETITION_400, "method": "g2d", "method.start_epoch": 4, "train.epochs": 4}
        )


CONFIG: dict[str, Any] = {
    **COMPETITION_400,
    "method": "g2d",
    "dataset.n_train": 300,
    "dataset.n_test": 400,
    "train.epochs": 3,
    "train.unimodal_pretrain_epochs": 2,
}


def test_g2d_learns_and_resumes_exactly_with_its_teachers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve_config(CONFIG)
    reference = fit(cfg, tmp_path / "reference")
    assert reference.metrics["test"]["accuracy"] > 0.5  # 5 classes: chance is 0.2
    pretrained = load_checkpoint(tmp_path / "reference" / "pretrain" / "best.ckpt")["model"]
    teachers = load_checkpoint(tmp_path / "reference" / "last.ckpt")["method"]["teachers"]
    for m, state in teachers.items():  # frozen all along: still the pre-trained weights
        for k, v in state.items():  # "encoder.<key>" and "head.<key>"
            part, key = k.split(".", 1)
            where = {"encoder": "encoders", "head": "unimodal_heads"}[part]
            assert torch.equal(v, pretrained[f"{where}.{m}.{key}"]), (m, k)
    resumed = fit_killed_and_resumed(cfg, tmp_path / "killed", monkeypatch, after_epoch=1)
    assert without_time(resumed.history) == without_time(reference.history)
    assert resumed.metrics == reference.metrics
