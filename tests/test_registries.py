"""Registries know their built-ins without importing them, and the lists match the modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmbalance.data import DATASETS
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.models import ENCODERS, FUSION_HEADS
from mmbalance.optim import OPTIMIZERS, SCHEDULES
from mmbalance.registry import Registry

LAZY = {"method": METHODS, "dataset": DATASETS, "encoder": ENCODERS, "fusion head": FUSION_HEADS}


@pytest.mark.parametrize("kind", list(LAZY))
def test_each_builtin_list_matches_what_its_modules_register(kind: str) -> None:
    registry = LAZY[kind]
    registry.load_all()
    registered = {name for name, _ in registry.items()}
    assert registered == set(registry.builtins), (
        f"{kind}s registered but not listed: {sorted(registered - set(registry.builtins))}; "
        f"listed but not registered: {sorted(set(registry.builtins) - registered)}"
    )


def test_a_listed_name_whose_module_does_not_register_it_is_an_error() -> None:
    registry: Registry[int] = Registry("thing", "mmbalance", {"ghost": "errors"})
    with pytest.raises(RuntimeError, match="does not register the thing 'ghost'"):
        registry.get("ghost")


def test_unknown_names_list_the_valid_ones_and_suggest_close_ones() -> None:
    with pytest.raises(ConfigError, match="unknown method 'ogm-ge'; did you mean ogm_ge"):
        METHODS.get("ogm-ge")
    with pytest.raises(ConfigError, match="valid optimizers: adam, adamw, sgd"):
        OPTIMIZERS.get("rmsprop")
    assert SCHEDULES.names() == ["cosine", "none", "step"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return set(out)


def test_the_command_line_and_the_registries_start_without_torch() -> None:
    loaded = _modules_after(
        "import mmbalance, mmbalance.cli, mmbalance.builder, mmbalance.compare\n"
        "from mmbalance.methods import METHODS\nMETHODS.names()\n"
        "from mmbalance.data import DATASETS\nDATASETS.names()\n"
        "from mmbalance.cli import build_parser\nbuild_parser()"
    )
    assert "torch" not in loaded and "lightning" not in loaded


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "nope"},
        {"dataset": "nope"},
        {"fusion": "nope"},
        {"train.optimizer": "nope"},
        {"encoder.m1": "nope"},
    ],
)
def test_an_unknown_name_fails_before_torch_is_imported(overrides: dict[str, str]) -> None:
    loaded = _modules_after(
        "from mmbalance.builder import resolve_config\nfrom mmbalance.errors import ConfigError\n"
        f"try:\n    resolve_config({overrides!r})\nexcept ConfigError:\n    pass\n"
        "else:\n    raise SystemExit('no error')"
    )
    assert "torch" not in loaded


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--method", "nope"],
        ["train", "--dataset", "nope", "--out", "/nonexistent/x", "--resume"],
        ["compare", "--methods", "joint,nope", "--out", "/nonexistent/x"],
    ],
)
def test_the_command_line_rejects_an_unknown_name_without_torch(argv: list[str]) -> None:
    loaded = _modules_after(
        f"from mmbalance.cli import main\nassert main({argv!r}) == 2, 'not rejected'"
    )
    assert "torch" not in loaded
