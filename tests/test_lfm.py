"""LFM: the Jensen-Shannon alignment and the weighted loss against the formula (M = 2 and 3), the
weight's Hessian-vector gradient against finite differences, the update's step size, clipping and
data (held-out training samples only), kill-and-resume exactness, and learning."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPETITION_400

from mmbalance.build import resolve_config
from mmbalance.data.base import Batch
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, StepContext, build_method
from mmbalance.methods.lfm import LFM, alignment, alpha_gradient, alpha_step
from mmbalance.methods.ops.modality_logits import modality_logits
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit


def js_by_hand(u: torch.Tensor, v: torch.Tensor) -> float:
    """Batch mean of ``(KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``, from the definition."""
    total = 0.0
    for row_u, row_v in zip(u, v, strict=True):
        p, q = row_u.softmax(-1).tolist(), row_v.softmax(-1).tolist()
        mix = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
        kl_p = sum(a * math.log(a / c) for a, c in zip(p, mix, strict=True))
        kl_q = sum(b * math.log(b / c) for b, c in zip(q, mix, strict=True))
        total += 0.5 * (kl_p + kl_q)
    return total / len(u)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_alignment_and_weighted_loss_equal_the_formula(names: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    dims = {n: 3 + i for i, n in enumerate(names)}
    head = LateSumFusion(dims, 4)
    latents = {n: torch.randn(5, d) for n, d in dims.items()}
    fused = head(latents)
    output = ModelOutput(fused.logits, latents, {}, fused.contributions)
    y = torch.tensor([0, 1, 2, 3, 0])
    own = modality_logits(output, head)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    js = sum(js_by_hand(own[a], own[b]) for a, b in pairs) / len(pairs)
    assert float(alignment(own).detach()) == pytest.approx(js, rel=1e-5)
    method = build_method("lfm", {"alpha_init": 0.3})
    terms = method.losses(output, StepContext.standalone(y, fusion=head))
    torch.testing.assert_close(terms["task"], 2 * 0.7 * F.cross_entropy(fused.logits, y))
    assert float(terms["align"].detach()) == pytest.approx(2 * 0.3 * js, rel=1e-5)


def test_alignment_is_bounded_by_ln2_for_saturated_predictions() -> None:
    u = torch.tensor([[60.0, 0.0, 0.0]])
    v = torch.tensor([[0.0, 60.0, 0.0]])
    value = float(alignment({"a": u, "b": v}))
    assert math.isfinite(value) and value == pytest.approx(math.log(2), rel=1e-6)


def _model() -> MultimodalModel:
    torch.manual_seed(3)
    encoders = {"a": MLPEncoder((4,), hidden=[6], out_dim=3), "b": MLPEncoder((5,), [6], 3)}
    model = MultimodalModel(encoders, LateSumFusion({"a": 3, "b": 3}, 3))
    return model.double()


def _batches() -> list[Batch]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for n in (7, 4):  # uneven batches: each weighs by its size
        inputs = {
            "a": torch.randn(n, 4, generator=gen, dtype=torch.float64),
            "b": torch.randn(n, 5, generator=gen, dtype=torch.float64),
        }
        out.append(Batch(inputs, torch.randint(0, 3, (n,), generator=gen), torch.arange(n)))
    return out


def _objectives(model: MultimodalModel, batches: list[Batch], alpha: float):
    inputs = {m: torch.cat([b.inputs[m] for b in batches]) for m in ("a", "b")}
    y = torch.cat([b.targets for b in batches])
    output = model(inputs)
    ce = F.cross_entropy(output.logits, y)
    return ce, (1 - alpha) * ce + alpha * alignment(modality_logits(output, model.fusion))


def test_alpha_gradient_matches_finite_differences_of_the_gradient() -> None:
    model, batches, alpha = _model(), _batches(), 0.4
    params = list(model.parameters())
    ce, _ = _objectives(model, batches, alpha)
    v = torch.autograd.grad(ce, params)  # the CE gradient over all held-out samples

    def grad_first(shift: float) -> torch.Tensor:
        with torch.no_grad():
            for p, u in zip(params, v, strict=True):
                p.add_(shift * u)
        _, total = _objectives(model, batches, alpha)
        (g,) = torch.autograd.grad(total, [params[0]])
        with torch.no_grad():
            for p, u in zip(params, v, strict=True):
                p.sub_(shift * u)
        return g

    eps = 1e-5
    hvp = (grad_first(eps) - grad_first(-eps)) / (2 * eps)  # (H v) on theta_0
    got = alpha_gradient(model, lambda: batches, alpha)
    assert got == pytest.approx(float(hvp.mean()), rel=1e-5, abs=1e-9)
    assert got != 0.0
    assert model.training  # the mode it found is restored


def test_update_step_halving_and_clipping() -> None:
    model, batches = _model(), _batches()
    seen: list[str] = []

    def held_out(split: str) -> list[Batch]:
        seen.append(split)
        return batches

    g = alpha_gradient(model, lambda: batches, 0.5)
    for epoch, lr in ((0, 1e-2), (19, 1e-2), (20, 5e-3), (45, 2.5e-3)):
        method = LFM(alpha_init=0.5, lr_alpha=1e-2)
        ctx = EpochContext.standalone(epoch, model=model, batches=held_out)
        method.on_epoch_start(ctx)
        assert method.alpha == pytest.approx(0.5 - lr * g, rel=1e-9)
        assert ctx.logs["alpha"] == pytest.approx(method.alpha)
    assert set(seen) == {"held_out"}  # never validation, never test
    # clipped to [alpha_min, alpha_max]
    far = LFM(alpha_init=0.5, lr_alpha=100.0 / abs(g))
    far.on_epoch_start(EpochContext.standalone(0, model=model, batches=held_out))
    assert far.alpha == (0.05 if g > 0 else 0.95)
    assert alpha_step(0.5, 10.0, 1.0, 0.05, 0.95) == 0.05
    assert alpha_step(0.5, -10.0, 1.0, 0.05, 0.95) == 0.95


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="alpha_init"):
        build_method("lfm", {"alpha_init": 0.99})
    with pytest.raises(ConfigError, match="held_out"):
        build_method("lfm", {"held_out": 0.0})
    with pytest.raises(ConfigError, match="halve_every"):
        build_method("lfm", {"halve_every": 0})
    assert LFM(held_out=0.1).held_out_fraction == 0.1


BASE: dict[str, Any] = {
    **COMPETITION_400,
    "method": "lfm",
    "method.held_out": 0.05,
    "method.lr_alpha": 0.05,  # large, so that the weight visibly moves in a few epochs
    "train.epochs": 4,
}


def test_lfm_learns_the_competition_task(tmp_path: Path) -> None:
    cfg = resolve_config({**BASE, "method.lr_alpha": 1e-4, "train.epochs": 6})
    result = fit(cfg, tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    assert all(0.05 <= r["method_alpha"] <= 0.95 for r in result.history)
