"""The documented examples run and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
