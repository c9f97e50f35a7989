"""Robustness to a missing or corrupted modality at test time (mmbalance.eval.robustness)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmbalance.eval.robustness import (
    RATES,
    corrupted_mask,
    rate_key,
    robustness_metrics,
    summary_key,
)
from mmbalance.methods import build_method
from tests.conftest import make_trainer

#: Every sample's label is in m1 alone: m2 is pure noise.
ONLY_M1 = {"dataset.shares": [0.0, 1.0, 0.0], "dataset.n_test": 1000, "train.epochs": 4}


def _trained(method: str, tmp_path: Any, **overrides: Any) -> tuple[Any, dict[str, float]]:
    trainer = make_trainer(build_method(method, {}), tmp_path / method, **(ONLY_M1 | overrides))
    result = trainer.run(False)
    trainer.module.eval()
    return trainer, result.metrics["test"]


def test_robustness_at_zero_rate_is_the_plain_accuracy_and_absence_of_the_only_signal_is_chance(
    tmp_path,
) -> None:
    trainer, test = _trained("joint", tmp_path)
    assert test["accuracy"] > 0.7  # m1 carries every label and is easy
    at_zero = trainer.robustness(rates=(0.0,))
    for kind in ("missing", "noisy"):
        for m in ("m1", "m2"):
            assert at_zero[rate_key(kind, m, 0.0)] == test["accuracy"]
    # the run's own metrics: every rate, every modality, both corruptions, the summaries
    for rate in RATES:
        for m in ("m1", "m2"):
            assert {rate_key("missing", m, rate), rate_key("noisy", m, rate)} <= test.keys()
        worst = min(test[rate_key("missing", m, rate)] for m in ("m1", "m2"))
        assert test[summary_key(rate)] == worst
    chance = 1 / 5  # five equally likely classes
    assert abs(test["missing_m1_100"] - chance) < 0.05  # 1000 test samples: SE 0.013
    assert abs(test["noisy_m1_100"] - chance) < 0.05
    assert test["missing_m1_20"] > test["missing_m1_50"] > test["missing_m1_100"]
    assert test["missing_m2_100"] > 0.7  # m2 carries nothing: losing it costs little


def test_an_ensemble_without_a_modality_is_the_other_modalitys_model(tmp_path) -> None:
    trainer, test = _trained("ensemble", tmp_path, **{"dataset.shares": [0.5, 0.3, 0.2]})
    # its own rule (the average over the heads present), not a zero latent
    assert test["missing_m1_100"] == pytest.approx(test["unimodal_accuracy_m2"], abs=1e-12)
    assert test["missing_m2_100"] == pytest.approx(test["unimodal_accuracy_m1"], abs=1e-12)
    assert "present" in type(trainer.method).missing_modality
    assert "zero" in build_method("joint", {}).missing_modality


def test_every_method_sees_the_same_corrupted_samples_and_noise(tmp_path, monkeypatch) -> None:
    import mmbalance.eval.robustness as robustness

    joint, _ = _trained("joint", tmp_path, **{"train.epochs": 1})
    ensemble, _ = _trained("ensemble", tmp_path, **{"train.epochs": 1})
    original = robustness.sample_noise
    seen: dict[str, tuple[list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]] = {}
    # two methods, two batch sizes: the same samples lose a modality, with the same noise
    for name, trainer, batch in (("joint", joint, 64), ("ensemble", ensemble, 100)):
        masks: list[torch.Tensor] = []
        noise: dict[tuple[int, int], torch.Tensor] = {}

        def predict_missing(heads, latents, missing, method=trainer.method, masks=masks):
            masks.extend(v.clone() for v in missing.values())
            return method.predict_missing(heads, latents, missing)

        def recording_noise(index, shape, position, mean, std, noise=noise):
            out = original(index, shape, position, mean, std)
            noise.update({(position, int(i)): row for i, row in zip(index, out, strict=True)})
            return out

        monkeypatch.setattr(robustness, "sample_noise", recording_noise)
        robustness_metrics(
            trainer.model.heads,
            trainer.data.splits["test"],
            predict_missing,
            lambda inputs, trainer=trainer: trainer.method.encode_eval(trainer.model, inputs),
            trainer.model.modalities,
            batch_size=batch,
        )
        seen[name] = (masks, noise)
    (masks_a, noise_a), (masks_b, noise_b) = seen["joint"], seen["ensemble"]
    assert len(masks_a) == len(masks_b) == 2 * len(RATES)
    assert all(torch.equal(x, y) for x, y in zip(masks_a, masks_b, strict=True))
    assert noise_a.keys() == noise_b.keys() and len(noise_a) == 2 * 1000
    assert all(torch.equal(noise_a[k], noise_b[k]) for k in noise_a)
    # nested: the samples of 20 % are among those of 50 %, and the counts are round(r * n)
    m20, m50, m100 = (corrupted_mask(1000, 0, r) for r in RATES)
    assert int(m20.sum()) == 200 and int(m50.sum()) == 500 and bool(m100.all())
    assert bool((m50 | ~m20).all())
    assert not torch.equal(corrupted_mask(1000, 0, 0.5), corrupted_mask(1000, 1, 0.5))
