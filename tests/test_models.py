"""Encoders and the multimodal model."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError, DataError
from mmbalance.models import MultimodalModel, build_encoder, build_fusion
from mmbalance.models.encoders import ResNet18Encoder


def test_resnet18_standard_width_has_resnet18_size() -> None:
    enc = ResNet18Encoder((3, 32, 32))
    n_params = sum(p.numel() for p in enc.parameters())
    assert enc.out_dim == 512
    assert 11.1e6 < n_params < 11.3e6  # torchvision's resnet18 without fc: 11.18 M


def test_resnet18_image_spectrogram_and_clip() -> None:
    image = build_encoder("resnet18", (1, 16, 20), {"width": 8, "small_input": True})
    assert image(torch.randn(2, 1, 16, 20)).shape == (2, 64)
    clip_enc = build_encoder("resnet18", (3, 4, 16, 16), {"width": 8, "small_input": True})
    clip = torch.randn(2, 3, 4, 16, 16)
    feats = clip_enc(clip)
    assert feats.shape == (2, 64)
    # a clip's feature is the mean of its frames' features (eval mode: no batch statistics)
    clip_enc.eval()
    frames = torch.stack(
        [clip_enc.layers(clip_enc.stem(clip[:, :, t])).mean((2, 3)) for t in range(4)]
    )
    torch.testing.assert_close(clip_enc(clip), frames.mean(0), rtol=1e-4, atol=1e-5)


def test_sequence_transformer_and_mlp() -> None:
    seq = build_encoder("sequence_transformer", (10, 5), {"d_model": 8, "heads": 2})
    assert seq(torch.randn(3, 10, 5)).shape == (3, 8)
    assert seq(torch.randn(3, 7, 5)).shape == (3, 8)  # shorter sequences work
    mlp = build_encoder("mlp", (4, 3), {"hidden": [8], "out_dim": 5})
    assert mlp(torch.randn(2, 4, 3)).shape == (2, 5)


def test_encoders_reject_wrong_shapes() -> None:
    with pytest.raises(DataError, match=r"resnet18 got input of shape \(2, 3, 8, 8\)"):
        build_encoder("resnet18", (1, 8, 8), {"width": 4})(torch.randn(2, 3, 8, 8))
    with pytest.raises(DataError, match="mlp encoder got input"):
        build_encoder("mlp", (4,), {})(torch.randn(2, 5))
    with pytest.raises(ConfigError, match="unknown encoder 'vgg'"):
        build_encoder("vgg", (4,), {})
    with pytest.raises(ConfigError, match="width must be >= 1"):
        build_encoder("resnet18", (1, 8, 8), {"width": 0})


def _model(heads: bool = True) -> MultimodalModel:
    encoders = {
        "audio": build_encoder("mlp", (4,), {"hidden": [8], "out_dim": 6}),
        "video": build_encoder("mlp", (3,), {"hidden": [8], "out_dim": 5}),
    }
    fusion = build_fusion("late_sum", {"audio": 6, "video": 5}, 3, {})
    return MultimodalModel(encoders, fusion, unimodal_heads=heads)


def test_model_output_is_structured() -> None:
    model = _model()
    out = model({"audio": torch.randn(2, 4), "video": torch.randn(2, 3)})
    assert out.logits.shape == (2, 3)
    assert set(out.latents) == {"audio", "video"} and out.latents["audio"].shape == (2, 6)
    assert set(out.unimodal_logits) == {"audio", "video"}
    assert set(out.contributions) == {"audio", "video"}
    assert out.modalities == ("audio", "video")
    assert not _model(heads=False)(
        {"audio": torch.randn(2, 4), "video": torch.randn(2, 3)}
    ).unimodal_logits


def test_latent_transform_is_applied_before_heads() -> None:
    model = _model()
    inputs = {"audio": torch.randn(2, 4), "video": torch.randn(2, 3)}
    zeroed = model(
        inputs, latent_transform=lambda z: {m: torch.zeros_like(v) for m, v in z.items()}
    )
    torch.testing.assert_close(zeroed.logits, model.fusion.shared_bias.expand(2, 3))


def test_model_rejects_mismatched_modalities() -> None:
    model = _model()
    with pytest.raises(DataError, match=r"data has modalities \['audio', 'text'\]"):
        model({"audio": torch.randn(2, 4), "text": torch.randn(2, 3)})
    with pytest.raises(DataError, match="name different modalities"):
        MultimodalModel(
            {"x": build_encoder("mlp", (4,), {}), "y": build_encoder("mlp", (4,), {})},
            build_fusion("late_sum", {"audio": 64, "video": 64}, 3, {}),
        )
