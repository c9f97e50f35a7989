"""The cost benchmark (``benchmarks/bench_cost.py``) runs and produces sane records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is a package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_cost import (  # noqa: E402
    Entry,
    make_settings,
    memory_setting,
    run_cost,
)
from mmbalance.methods import METHODS  # noqa: E402


def test_run_cost_quick_covers_every_method(tmp_path: Path) -> None:
    records = run_cost(tmp_path, quick=True, threads=1, settings=["small"], memory=False)
    methods = {r["method"] for r in records}
    assert set(METHODS.names()) <= methods
    assert all(r["ms_per_step"] > 0 and r["ratio_to_joint"] > 0 for r in records)
    joint = [r for r in records if r["method"] == "joint"]
    assert len(joint) == 1 and joint[0]["ratio_to_joint"] == 1.0
    assert json.loads((tmp_path / "cost_cpu.json").read_text()) == records
    table = (tmp_path / "cost_cpu.md").read_text()
    assert "| mcr |" in table and "≤ 1.50" in table
    floor = {r["method"]: r for r in records if "ratio_to_floor" in r}
    assert set(floor) == {"mmpareto", "mmpareto[floor]"}
    assert floor["mmpareto[floor]"]["ratio_to_floor"] == 1.0


def test_peak_memory_in_a_fresh_process() -> None:
    setting = next(s for s in make_settings(True, "cpu") if s.name == "small")
    setting.entries = [Entry("joint", "joint"), Entry("mcr", "mcr")]
    memory = memory_setting(setting, "cpu", threads=1)
    assert set(memory) == {"joint", "mcr"}
    for base, peak in memory.values():
        assert base > 0 and peak >= 0
