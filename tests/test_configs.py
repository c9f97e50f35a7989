"""Every shipped YAML config is valid (for datasets not registered yet: every other section)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmbalance.build import resolve_config
from mmbalance.config import build_config, build_dataclass, load_yaml
from mmbalance.data import DATASETS
from mmbalance.methods import METHODS
from mmbalance.models import FUSION_HEADS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


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
