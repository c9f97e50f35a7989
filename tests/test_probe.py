"""Linear probes: they separate what is separable, and scikit-learn's BLAS stays within torch's
thread budget (parallel training processes of one thread each must not oversubscribe)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from threadpoolctl import threadpool_info

from mmbalance.eval import probe as probe_module
from mmbalance.eval.probe import probe_predictions


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    z = torch.randn(n, 8, generator=gen) + 3.0 * torch.nn.functional.one_hot(y, 8).float()
    return z, y


def test_probe_separates_separable_latents() -> None:
    z_train, y_train = _blobs(300, 0)
    z_test, y_test = _blobs(300, 1)
    noise = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    preds = probe_predictions({"a": z_train, "b": noise}, y_train, {"a": z_test, "b": noise})
    assert float((preds["a"] == y_test).float().mean()) > 0.9
    assert float((preds["b"] == y_test).float().mean()) < 0.6  # chance is 1/3


@pytest.mark.parametrize("threads", [1, 2])
def test_probe_blas_threads_follow_torch(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    seen: list[int] = []
    original = probe_module._probe_one

    def spy(*args: Any) -> torch.Tensor:
        seen.extend(pool["num_threads"] for pool in threadpool_info())
        return original(*args)

    monkeypatch.setattr(probe_module, "_probe_one", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z, y = _blobs(60, 0)
        probe_predictions({"a": z}, y, {"a": z})
    finally:
        torch.set_num_threads(before)
    assert seen and max(seen) <= threads
