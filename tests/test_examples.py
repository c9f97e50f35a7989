"""The documented examples run and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_example_learns_with_methods_outside_the_trainer() -> None:
    example = _load("plain_pytorch")
    for method in ("joint", "multiloss", "ensemble"):
        assert example.train(method, steps=150) > 0.8, method


@pytest.mark.parametrize("method", ["mcr", "ogm_ge", "opm", "mmpareto"])
def test_own_loop_example_learns_and_the_method_acts(method: str) -> None:
    example = _load("own_loop")
    result = example.train(method, epochs=3)
    assert result["test_accuracy"] > 0.6, result["test_accuracy"]  # chance: 0.25
    logs = result["logs"]
    if method == "mcr":  # lam_ceb > 0: the CEB head is the method's own, trained module
        assert {"mipd", "con", "ceb"} <= set(result["losses"])
        assert result["method_module"] is not None
        assert all("mcr_div_audio" in step for step in logs)
    elif method == "ogm_ge":  # the audio is the strong modality: its gradient is damped
        assert min(step["coeff_audio"] for step in logs) < 1.0
    elif method == "opm":  # batches in which the audio's features were dropped with q > 0
        assert any(step["q_audio"] > 0 and step["opm_executed"] == 1.0 for step in logs)
    else:  # one Pareto decision per encoder and step
        assert all({"cos_audio", "cos_video", "alpha_task_audio"} <= set(s) for s in logs)
