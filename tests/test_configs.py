"""Every shipped YAML config is valid, ships with the package and is found by its name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from mmbalance.build import resolve_config
from mmbalance.config import build_config, build_dataclass, load_yaml, renamed_options
from mmbalance.data import DATASETS
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.models import FUSION_HEADS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "mmbalance" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path: Path) -> None:
    overrides = load_yaml(path)
    if overrides.get("dataset", "synthetic") in DATASETS:
        resolve_config(overrides)
        return
    cfg = build_config(overrides)
    method = METHODS.get(cfg.method.name)
    build_dataclass(method.Params, cfg.method.params, f"method.{cfg.method.name}")
    FUSION_HEADS.get(cfg.fusion.name)


def test_every_shipped_config_is_in_the_package_data() -> None:
    """``pyproject.toml`` ships the configs with the package (a wheel carries every one), and a
    config is found by its name from any directory."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from mmbalance.config import PACKAGED_CONFIGS, config_path

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mmbalance"]
    assert CONFIGS
    for path in CONFIGS:
        rel = path.relative_to(root / "mmbalance").as_posix()
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns)
        name = path.relative_to(PACKAGED_CONFIGS)
        assert config_path(name) == path
        assert config_path(Path("configs") / name) == path


@dataclass
class _Options:
    """Toy options with a renamed one."""

    renamed_options: ClassVar[dict[str, str]] = {"old_weight": "weight"}
    weight: float = 1.0


@dataclass
class _MoreOptions(_Options):
    """A subclass renames one more and inherits its base's renames."""

    renamed_options: ClassVar[dict[str, str]] = {"start": "start_epoch"}
    start_epoch: int = 0


def test_a_renamed_option_is_answered_with_its_new_name() -> None:
    assert renamed_options(_MoreOptions) == {"old_weight": "weight", "start": "start_epoch"}
    for key, new in (("old_weight", "weight"), ("start", "start_epoch")):
        with pytest.raises(ConfigError) as err:
            build_dataclass(_MoreOptions, {key: 2}, "method.toy")
        assert str(err.value) == f"method.toy key {key!r} was renamed: use {new!r} instead"
    with pytest.raises(ConfigError, match=r"unknown method\.toy key .nope.; valid keys: weight"):
        build_dataclass(_MoreOptions, {"nope": 2}, "method.toy")
    assert build_dataclass(_MoreOptions, {"weight": 2, "start_epoch": 1}, "x").weight == 2.0
