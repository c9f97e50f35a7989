"""The synthetic benchmark and its Bayes accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from mmbalance.builder import build_dataset, resolve_config
from mmbalance.data.synthetic import SyntheticParams, SyntheticProcess
from mmbalance.errors import ConfigError


def _brute_force_bayes(process: SyntheticProcess, n: int, seed: int) -> float:
    """Accuracy of argmax of a posterior built from explicit Gaussian densities (scipy)."""
    p = process.p
    gen = torch.Generator().manual_seed(seed)
    h, y, _ = process.sample(n, gen)
    h = h.numpy()
    eye = np.eye(p.latent_dim)
    post = np.zeros((n, p.num_classes))
    for t, share in enumerate(p.shares):
        for c in range(p.num_classes):
            dens = np.full(n, share / p.num_classes)
            for m in range(p.num_modalities):
                mean = process.carries[t, m].item() * p.signal[m] * process.means[m, c].numpy()
                dens = dens * multivariate_normal(mean, eye).pdf(h[m])
            post[:, c] += dens
    return float(np.mean(post.argmax(1) == y.numpy()))


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_bayes_accuracy_matches_brute_force(num_modalities: int) -> None:
    params = SyntheticParams(num_modalities=num_modalities, latent_dim=4, seed=3)
    process = SyntheticProcess(params)
    exact = process.bayes_accuracy(100_000, seed=1)
    brute = _brute_force_bayes(process, 20_000, seed=2)
    # brute force is a Monte-Carlo accuracy on 20k samples: std about 0.003
    assert abs(exact - brute) < 0.012
    # and no classifier fitted on the latents can beat it by more than noise
    gen = torch.Generator().manual_seed(5)
    h, y, _ = process.sample(20_000, gen)
    posterior_pred = process.log_posterior(h).argmax(1)
    assert abs((posterior_pred == y).double().mean().item() - exact) < 0.012


def test_dataset_is_deterministic_and_standardised(small: dict) -> None:
    a = build_dataset(resolve_config(small))
    from mmbalance.builder.assemble import _DATASET_CACHE

    _DATASET_CACHE.clear()
    b = build_dataset(resolve_config(small))
    for split in ("train", "val", "test"):
        for m in ("m1", "m2"):
            assert torch.equal(a.splits[split].inputs[m], b.splits[split].inputs[m])
    train = a.splits["train"].inputs["m1"]
    torch.testing.assert_close(train.mean(0), torch.zeros(train.shape[1]), atol=1e-4, rtol=0)
    assert a.bayes_accuracy is not None and 0.2 < a.bayes_accuracy <= 1.0
    c = build_dataset(resolve_config({**small, "dataset.seed": 1}))
    assert not torch.equal(c.splits["train"].inputs["m1"], a.splits["train"].inputs["m1"])


def test_weak_modality_carries_less_information() -> None:
    p = SyntheticParams(n_bayes=1)
    process = SyntheticProcess(p)
    gen = torch.Generator().manual_seed(0)
    h, y, _ = process.sample(20_000, gen)
    accs = []
    for m in range(2):
        only = SyntheticParams(
            num_modalities=2, shares=p.shares, signal=[p.signal[m], 0.0], depth=[1, 1], n_bayes=1
        )
        single = SyntheticProcess(only)
        single.means = process.means[[m, 1 - m]]
        posterior = single.log_posterior(torch.stack([h[m], torch.zeros_like(h[m])]))
        accs.append((posterior.argmax(1) == y).double().mean().item())
    assert accs[0] > accs[1] + 0.2


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ConfigError, match="shares must sum to 1"):
        SyntheticParams(shares=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="signal needs 2 values"):
        SyntheticParams(signal=[1.0])
    with pytest.raises(ConfigError, match="must be given for num_modalities=4"):
        SyntheticParams(num_modalities=4)


def test_presets_fill_lists_and_explicit_values_win() -> None:
    default = SyntheticParams()
    assert (default.shares, default.signal, default.depth, default.leak) == (
        [0.1, 0.7, 0.2],
        [3.0, 1.0],
        [1, 4],
        0.2,
    )
    comp = SyntheticParams(preset="competition")
    assert (comp.shares, comp.signal, comp.depth, comp.leak) == (
        [0.8, 0.15, 0.05],
        [3.0, 1.0],
        [1, 6],
        0.02,
    )
    mixed = SyntheticParams(preset="competition", depth=[1, 3], leak=0.1)
    assert mixed.depth == [1, 3] and mixed.leak == 0.1 and mixed.shares == [0.8, 0.15, 0.05]
    small = {
        "dataset.n_train": 64,
        "dataset.n_val": 32,
        "dataset.n_test": 32,
        "dataset.n_bayes": 100,
    }
    bundle = build_dataset(
        resolve_config({"dataset": "synthetic", "dataset.preset": "competition", **small})
    )
    assert bundle.bayes_accuracy is not None and bundle.bayes_accuracy > 0.9
    with pytest.raises(ConfigError, match="preset=competition"):
        SyntheticParams(num_modalities=3, preset="competition")
    with pytest.raises(ConfigError):
        resolve_config({"dataset": "synthetic", "dataset.preset": "hard"})
