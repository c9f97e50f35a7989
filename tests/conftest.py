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


@pytest.fixture
def small() -> dict[str, Any]:
    """Overrides for a synthetic run that trains in about a second."""
    return dict(SMALL)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMBALANCE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
