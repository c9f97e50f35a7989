"""Every shipped YAML config is valid, ships with the package and is found by its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmbalance.builder import resolve_config
from mmbalance.config import build_config, build_dataclass, load_yaml
from mmbalance.data import DATASETS
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
