"""Shared fixtures: small, fast settings of the synthetic benchmark."""

from __future__ import annotations

from typing import Any

import pytest

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 480,
    "dataset.n_val": 300,
    "dataset.n_test": 1000,
    "dataset.n_bayes": 4000,
    "train.epochs": 6,
    "train.progress": False,
    "train.tensorboard": False,
}

#: The same small synthetic run as command-line ``key=value`` arguments (two epochs).
FAST_ARGS: list[str] = [
    "dataset.n_train=240",
    "dataset.n_val=200",
    "dataset.n_test=400",
    "dataset.n_bayes=2000",
    "train.epochs=2",
    "train.progress=false",
    "train.tensorboard=false",
]


@pytest.fixture
def small() -> dict[str, Any]:
    """Overrides for a synthetic run that trains in about a second."""
    return dict(SMALL)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMBALANCE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# The ``competition`` preset of the synthetic benchmark (m1 easy, m2 informative but hard): joint
# training leaves the m2 encoder under-trained, so balancing methods have room to show a gain.
COMPETITION: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.preset": "competition",
    "dataset.n_test": 2000,
    "dataset.n_bayes": 1000,
    "train.progress": False,
    "train.tensorboard": False,
}


@pytest.fixture
def competition_metrics(tmp_path):
    """``run(overrides, seeds)``: test metrics averaged over ``train.seed`` in ``seeds``."""
    from mmbalance.build import resolve_config
    from mmbalance.train import fit

    def run(overrides: dict[str, Any], seeds: tuple[int, ...] = (0, 1)) -> dict[str, float]:
        label = "_".join(f"{v}" for v in overrides.values())
        runs = [
            fit(
                resolve_config({**COMPETITION, **overrides, "train.seed": s}),
                tmp_path / f"{label}_seed{s}",
            ).metrics["test"]
            for s in seeds
        ]
        return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}

    return run
