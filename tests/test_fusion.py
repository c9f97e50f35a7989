"""Fusion heads: shapes, gradients, stop-gradient masks and additive contributions."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError, DataError
from mmbalance.models import FUSION_HEADS, build_fusion

DIMS = {"a": 6, "b": 4, "c": 5}


def _latents(n: int = 7, dims: dict[str, int] = DIMS) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {m: torch.randn(n, d, requires_grad=True) for m, d in dims.items()}


@pytest.mark.parametrize("name", FUSION_HEADS.names())
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_forward_backward_and_masking(name: str, num_modalities: int) -> None:
    dims = dict(list(DIMS.items())[:num_modalities])
    if FUSION_HEADS.get(name).equal_latent_dims:
        dims = dict.fromkeys(dims, 5)
        with pytest.raises(ConfigError, match="equal latent sizes"):
            build_fusion(name, DIMS, 4, {})
    torch.manual_seed(0)
    head = build_fusion(name, dims, 4, {})
    z = _latents(dims=dims)
    out = head(z)
    assert out.logits.shape == (7, 4)
    out.logits.square().sum().backward()
    assert all(z[m].grad is not None and z[m].grad.abs().sum() > 0 for m in dims)

    # stop_grad: same values, no gradient into the masked modality, others still get one
    masked_modality = next(iter(dims))
    z2 = _latents(dims=dims)
    masked = head(z2, stop_grad={masked_modality})
    torch.testing.assert_close(masked.logits, out.logits)
    masked.logits.square().sum().backward()
    assert z2[masked_modality].grad is None
    assert all(z2[m].grad.abs().sum() > 0 for m in dims if m != masked_modality)


@pytest.mark.parametrize("name", ["late_sum", "concat_linear"])
def test_additive_heads_decompose_exactly(name: str) -> None:
    head = build_fusion(name, DIMS, 3, {})
    assert head.additive
    z = _latents()
    out = head(z)
    total = sum(out.contributions.values()) + head.bias
    torch.testing.assert_close(out.logits, total)
    # each contribution depends on its own modality only
    z_changed = dict(z, a=torch.zeros_like(z["a"]))
    changed = head(z_changed).contributions
    torch.testing.assert_close(changed["b"], out.contributions["b"])
    assert torch.all(changed["a"] == 0)


def test_additive_stop_grad_blocks_own_weights_only() -> None:
    head = build_fusion("late_sum", DIMS, 3, {})
    head(_latents(), stop_grad={"a"}).logits.sum().backward()
    assert head.linears["a"].weight.grad is None
    assert head.linears["b"].weight.grad is not None
    assert head.shared_bias.grad is not None


def test_non_additive_heads_have_no_contributions() -> None:
    for name in ["concat_mlp", "film", "gated", "transformer"]:
        head = build_fusion(name, DIMS, 3, {})
        assert head(_latents()).contributions is None


def test_bad_inputs_are_named() -> None:
    head = build_fusion("late_sum", DIMS, 3, {})
    z = _latents()
    with pytest.raises(DataError, match="expects modalities"):
        head({"a": z["a"], "b": z["b"]})
    with pytest.raises(DataError, match="latent of modality 'b' has shape"):
        head(dict(z, b=torch.randn(7, 9)))
    with pytest.raises(ConfigError, match="unknown modalities"):
        head(z, stop_grad={"zzz"})
    with pytest.raises(ConfigError, match="unknown fusion head 'nope'"):
        build_fusion("nope", DIMS, 3, {})
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_fusion("film", DIMS, 3, {"wrong": 1})
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        build_fusion("late_sum", {"a": 3}, 3, {})
