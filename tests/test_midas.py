"""MIDAS: the misaligned samples' sources (another label, every order, M = 2 and 3, drawn from
the seeded generator), the soft label, hard-sample and weak-modality weights and the whole loss
against the formula computed here sample by sample, the warm-up, learning, determinism and an
exact kill-and-resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARN, fit_killed_and_resumed, without_time

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, StepContext
from mmbalance.methods.midas import (
    MIDAS,
    draw_sources,
    weak_modality_step,
    weak_update_sums,
)
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import ConcatLinearFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import fit


@pytest.mark.parametrize("m", [2, 3])
def test_sources_pair_each_sample_with_other_labels_in_every_order(m: int) -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    torch.manual_seed(0)
    orders = set()
    for _ in range(40):
        sources, valid = draw_sources(y, m)
        assert valid.all()
        for i in range(len(y)):
            row = sources[i].tolist()
            assert row.count(i) == 1  # the sample keeps exactly one of its modalities
            assert all(y[j] != y[i] for j in row if j != i)  # partners have another label
            orders.add(row.index(i))
    assert orders == set(range(m))  # the sample's own modality is any of them
    torch.manual_seed(5)
    first = draw_sources(y, m)
    torch.manual_seed(5)
    second = draw_sources(y, m)
    assert torch.equal(first[0], second[0])  # the global generator decides: seeded, resumable


def test_a_class_that_fills_the_batch_has_no_partner() -> None:
    sources, valid = draw_sources(torch.tensor([1, 1, 1]), 2)
    assert not valid.any() and torch.equal(sources, torch.tensor([[0, 0], [1, 1], [2, 2]]))


def _model(m: int) -> MultimodalModel:
    torch.manual_seed(1)
    names = ["a", "b", "c"][:m]
    encoders = {n: MLPEncoder((4,), hidden=[6], out_dim=5) for n in names}
    return MultimodalModel(encoders, ConcatLinearFusion({n: 5 for n in names}, 3), True)


WEIGHTS = [1.0, 1.6, 1.2]  # weak-modality weights, as an update may have left them


@pytest.mark.parametrize("m", [2, 3])
def test_the_misaligned_loss_equals_the_formula_sample_by_sample(m: int) -> None:
    model = _model(m)
    method = MIDAS(misaligned_weight=0.8, warmup_epochs=0)
    method.setup(ModelInfo(model.modalities, dict(model.fusion.latent_dims), 3))
    method.weak_weights = torch.tensor(WEIGHTS[:m])
    gen = torch.Generator().manual_seed(2)
    inputs = {n: torch.randn(6, 4, generator=gen) for n in model.modalities}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = StepContext.standalone(y, fusion=model.fusion)
    output = model(inputs)
    torch.manual_seed(11)
    terms = method.losses(output, ctx)
    torch.manual_seed(11)
    sources, _ = draw_sources(y, m)  # the same draw
    z = {n: v.detach() for n, v in output.latents.items()}
    u = {n: v.detach() for n, v in output.unimodal_logits.items()}
    names = list(z)
    expected = []
    for i in range(6):
        k = sources[i].tolist()
        conf = [u[n][k[c]].softmax(-1)[y[k[c]]] for c, n in enumerate(names)]
        c = [x / sum(conf) for x in conf]
        target = torch.zeros(3)
        for col in range(m):
            target[y[k[col]]] += WEIGHTS[col] * float(c[col])
        mixed = model.fusion({n: z[n][k[col]].unsqueeze(0) for col, n in enumerate(names)})
        ce = -(target * mixed.logits[0].log_softmax(-1)).sum()
        sims = [
            F.cosine_similarity(z[n][i], z[n][k[col]], dim=0)
            for col, n in enumerate(names)
            if k[col] != i
        ]
        hard = 1 + (sum(sims) / len(sims) + 1) / 2
        expected.append(float(hard) * ce)
    torch.testing.assert_close(terms["misaligned"], 0.8 * torch.stack(expected).mean())
    torch.testing.assert_close(terms["task"], F.cross_entropy(output.logits, y))
    uni = sum(F.cross_entropy(u[n], y) for n in names)
    torch.testing.assert_close(terms["unimodal"], uni)


def test_weak_modality_weight_update_follows_the_rule() -> None:
    confidences = torch.tensor([[0.7, 0.6, 0.8], [0.3, 0.4, 0.2]])  # modality 1 is the weak one
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    labels = torch.tensor([[0, 1, 0], [1, 0, 2]])  # (M, B): each modality's source label
    valid = torch.tensor([True, True, False])
    sums = weak_update_sums(confidences, probs, labels, valid)
    fused = [0.3 / (0.5 + 0.3), 0.1 / (0.8 + 0.1)]  # p~[y^(1)] / (p~[y^(0)] + p~[y^(1)])
    delta = (0.3 + 0.4) / 2 - sum(fused) / 2
    updated = weak_modality_step(torch.tensor([1.4, 1.3]), sums, 0.05)
    torch.testing.assert_close(updated, torch.tensor([1.0, max(1.0, 1.3 + 0.05 * delta)]))
    # a weight never falls below 1, and no valid row changes nothing
    low = weak_modality_step(torch.tensor([1.0, 1.0]), sums, 100.0)
    assert float(low.min()) == 1.0
    none = weak_update_sums(confidences, probs, labels, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(
        weak_modality_step(torch.tensor([1.4, 1.3]), none, 0.05), torch.tensor([1.4, 1.3])
    )


def test_the_weights_restart_every_epoch_and_the_warmup_trains_unimodal_losses_only() -> None:
    model = _model(2)
    method = MIDAS(warmup_epochs=1)
    method.setup(ModelInfo(model.modalities, dict(model.fusion.latent_dims), 3))
    method.weak_weights = torch.tensor([1.0, 2.0])
    method.on_epoch_start(EpochContext.standalone(1))
    assert torch.equal(method.weak_weights, torch.ones(2))
    y = torch.tensor([0, 1, 2, 0])
    output = model({n: torch.randn(4, 4) for n in model.modalities})
    terms = method.losses(output, StepContext.standalone(y, fusion=model.fusion, epoch=0))
    assert set(terms) == {"unimodal"}
    with pytest.raises(ConfigError, match="never act"):
        resolve_config({**LEARN, "method": "midas", "method.warmup_epochs": 3})


CONFIG: dict[str, Any] = {**LEARN, "method": "midas"}


def test_midas_learns_is_deterministic_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve_config(CONFIG)
    reference = fit(cfg, tmp_path / "reference")
    assert reference.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    again = fit(cfg, tmp_path / "again")
    assert without_time(again.history) == without_time(reference.history)
    resumed = fit_killed_and_resumed(cfg, tmp_path / "killed", monkeypatch, after_epoch=1)
    assert without_time(resumed.history) == without_time(reference.history)
    assert resumed.metrics == reference.metrics
