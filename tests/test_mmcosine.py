"""Tests of MMCosine and its cosine fusion head: logits against the formula and their bounds,
evaluation on the trained cosine logits, the method-declared head, and a learning test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LEARN

from mmbalance.builder import build_dataset, build_model, make_fabric, model_info, resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import build_method
from mmbalance.models import build_fusion
from mmbalance.models.cosine_head import CosineFusion
from mmbalance.train import Trainer, fit


def _cosine(z: torch.Tensor, w: torch.Tensor, s: float) -> torch.Tensor:
    """``s * cos(z_i, w_c)`` written out."""
    out = torch.empty(z.shape[0], w.shape[0])
    for i in range(z.shape[0]):
        for c in range(w.shape[0]):
            out[i, c] = s * torch.dot(z[i], w[c]) / (z[i].norm() * w[c].norm())
    return out


@pytest.mark.parametrize("dims", [{"a": 3, "b": 5}, {"a": 3, "b": 5, "c": 2}])
def test_logits_are_sums_of_scaled_cosines_bounded_by_s(dims: dict[str, int]) -> None:
    torch.manual_seed(0)
    s = 7.5
    head = build_fusion("cosine", dims, 4, {"scale": s})
    # large, unequal feature norms: the logits stay bounded anyway
    latents = {m: torch.randn(6, d) * (10.0**i) for i, (m, d) in enumerate(dims.items())}
    out = head(latents)
    assert head.bias is None
    total = torch.zeros(6, 4)
    for m, z in latents.items():
        expected = _cosine(z, head.weights[m].detach(), s)
        torch.testing.assert_close(out.contributions[m], expected)
        assert float(out.contributions[m].detach().abs().max()) <= s + 1e-5
        total += expected
    torch.testing.assert_close(out.logits, total)
    assert float(out.logits.detach().abs().max()) <= len(dims) * s + 1e-4
    # a latent on a class weight's direction reaches exactly s for that class
    aligned = {m: head.weights[m].detach()[:1] * 3.0 for m in dims}
    torch.testing.assert_close(head(aligned).contributions["a"][0, 0], torch.tensor(s))


def test_the_scale_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="scale"):
        build_fusion("cosine", {"a": 2, "b": 2}, 3, {"scale": 0})


def test_the_method_declares_its_head_and_refuses_another() -> None:
    cfg = resolve_config({"dataset": "synthetic", "method": "mmcosine"})
    assert cfg.fusion.name == "cosine"
    with pytest.raises(ConfigError, match="cosine"):
        resolve_config({"dataset": "synthetic", "method": "mmcosine", "fusion": "late_sum"})


def test_evaluation_scores_the_trained_cosine_logits(tmp_path: Path) -> None:
    cfg = resolve_config({**LEARN, "method": "mmcosine", "train.epochs": 1, "fusion.scale": 4.0})
    fabric = make_fabric(cfg)
    data = build_dataset(cfg)
    method = build_method("mmcosine", {})
    model = build_model(cfg, data, method)
    assert isinstance(model.fusion, CosineFusion)
    trainer = Trainer(
        fabric, cfg, data, model, method, method.setup(model_info(model, data)), tmp_path
    )
    trainer.run(resume=False)
    out = trainer.split_outputs("val", latents=True)
    expected = sum(
        _cosine(out[f"latent_{m}"], model.fusion.weights[m].detach(), 4.0) for m in model.modalities
    )
    torch.testing.assert_close(out["prediction"], expected, rtol=1e-4, atol=1e-4)
    assert float(out["prediction"].abs().max()) <= 2 * 4.0 + 1e-4
    accuracy = float((expected.argmax(1) == out["targets"]).float().mean())
    assert trainer.evaluate("val")["accuracy"] == pytest.approx(accuracy)


def test_mmcosine_learns_the_competition_preset(tmp_path: Path) -> None:
    result = fit(resolve_config({**LEARN, "method": "mmcosine"}), tmp_path / "mmcosine")
    assert result.metrics["test"]["accuracy"] >= 0.8  # chance is 0.2 (5 classes)
