"""DGL: the gradients of its one backward pass against autograd on the separated losses (the
encoders get only alpha times the unimodal losses' gradient through the head, the head only the
fused loss's), for M = 2 and 3 and additive and non-additive heads; learning and an exact
kill-and-resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARN, fit_killed_and_resumed, without_time

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import StepContext, build_method, total_loss
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import fit


def _model(m: int, fusion: str, seed: int = 0) -> MultimodalModel:
    torch.manual_seed(seed)
    names = ["a", "b", "c"][:m]
    encoders = {n: MLPEncoder((4 + i,), hidden=[6], out_dim=5) for i, n in enumerate(names)}
    head = build_fusion(fusion, {n: 5 for n in names}, 3, {})
    return MultimodalModel(encoders, head)


def _inputs(m: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {n: torch.randn(8, 4 + i, generator=gen) for i, n in enumerate(["a", "b", "c"][:m])}


@pytest.mark.parametrize(("m", "fusion"), [(2, "concat_linear"), (3, "late_sum"), (2, "film")])
def test_gradients_equal_the_separated_losses(m: int, fusion: str) -> None:
    model = _model(m, fusion)
    inputs, y = _inputs(m), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    alpha = 2.5
    # expected, from autograd on each loss separately
    latents = model.encode(inputs)
    enc_params = list(model.encoders.parameters())
    head_params = list(model.fusion.parameters())
    unimodal = sum(
        F.cross_entropy(
            model.fusion(
                {k: z if k == n else torch.zeros_like(z) for k, z in latents.items()}
            ).logits,
            y,
        )
        for n in latents
    )
    fused = F.cross_entropy(model.fusion({k: z.detach() for k, z in latents.items()}).logits, y)
    want_enc = torch.autograd.grad(alpha * unimodal, enc_params, retain_graph=True)
    want_head = torch.autograd.grad(fused, head_params)
    # what DGL's single backward gives
    method = build_method("dgl", {"unimodal_weight": alpha})
    ctx = StepContext.standalone(y, fusion=model.fusion)
    model.zero_grad(set_to_none=True)
    losses = method.losses(model(inputs), ctx)
    total_loss(losses).backward()
    for p, g in zip(enc_params, want_enc, strict=True):
        torch.testing.assert_close(p.grad, g)
    for p, g in zip(head_params, want_head, strict=True):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(losses["unimodal"], alpha * unimodal)
    torch.testing.assert_close(losses["task"], fused)


def test_a_fusion_that_is_no_module_is_refused() -> None:
    model = _model(2, "late_sum")
    method = build_method("dgl", {})
    ctx = StepContext.standalone(torch.zeros(8, dtype=torch.long), fusion=lambda z, s=(): None)
    with pytest.raises(ConfigError, match="module"):
        method.losses(model(_inputs(2)), ctx)
    with pytest.raises(ConfigError, match="unimodal_weight"):
        build_method("dgl", {"unimodal_weight": 0})


CONFIG: dict[str, Any] = {**LEARN, "method": "dgl"}


def test_dgl_learns_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = resolve_config(CONFIG)
    reference = fit(cfg, tmp_path / "reference")
    assert reference.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    resumed = fit_killed_and_resumed(cfg, tmp_path / "killed", monkeypatch, after_epoch=1)
    assert without_time(resumed.history) == without_time(reference.history)
    assert resumed.metrics == reference.metrics
