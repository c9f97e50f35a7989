"""The comparison engine: the runs of a comparison go to an executor, every run (trained,
reused or not finished) comes back as one kind of summary, and another comparison's search
choices train the same options without searching again."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from mmbalance.builder import resolve_config
from mmbalance.compare import (
    CollectOnly,
    Executor,
    PlannedRun,
    RunSummary,
    SearchOutcome,
    Sequential,
    run_comparison,
)
from mmbalance.errors import ConfigError

#: the learning rate of the tiny setting (the synthetic dataset's recommended one)
TINY_LR = resolve_config(TINY).train.lr


class Recording(Executor):
    """Executes runs one after another, remembering the batches it was handed."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[PlannedRun]]] = []

    def run(self, runs: Sequence[PlannedRun], title: str = "") -> list[RunSummary]:
        self.batches.append((title, list(runs)))
        return Sequential().run(runs, title)


def test_the_runs_go_to_the_executor_and_come_back_as_summaries(tmp_path: Path) -> None:
    executor = Recording()
    out = tmp_path / "cmp"
    done = run_comparison(
        ["joint", "multiloss"], TINY, out, seeds=2, executor=executor, report=False
    )
    ((title, runs),) = executor.batches
    assert title == ""
    assert [(r.label, r.seed, r.run_dir) for r in runs] == [
        (m, s, out / m / f"seed{s}") for m in ("joint", "multiloss") for s in (0, 1)
    ]
    assert [r.config.train.seed for r in runs] == [0, 1, 0, 1]
    assert all(isinstance(s, RunSummary) and s.finished for s in done.runs)
    assert done.records == [r for s in done.runs for r in s.records()]
    # a second comparison reuses every run: the same summaries, nothing trained
    again = run_comparison(["joint", "multiloss"], TINY, out, seeds=2, report=False)
    assert again.runs == done.runs
    collected = run_comparison(
        ["joint", "multiloss"], TINY, out, seeds=2, executor=CollectOnly(), report=False
    )
    assert collected.runs == done.runs


def test_collecting_trains_nothing_and_names_the_missing_runs(tmp_path: Path) -> None:
    done = run_comparison(["joint"], TINY, tmp_path, seeds=1, executor=CollectOnly())
    (run,) = done.runs
    assert (run.status, run.message) == ("missing", "not run")
    assert not (tmp_path / "joint" / "seed0").exists() and done.report_md is None
    assert done.records == [
        {
            "method": "joint",
            "seed": 0,
            "split": "run",
            "metric": "status",
            "value": "missing",
            "message": "not run",
        }
    ]


def test_a_search_hands_its_candidates_first_and_its_choice_serves_another_setting(
    tmp_path: Path,
) -> None:
    executor = Recording()
    first = run_comparison(
        ["joint"], TINY, tmp_path / "a", seeds=1, search=True, executor=executor, report=False
    )
    (title, candidates), (_, seeded) = executor.batches
    assert title == "search: " and [c.config.train.lr for c in candidates] == [
        0.5 * TINY_LR,
        TINY_LR,
        2 * TINY_LR,
    ]
    (outcome,) = first.search
    assert outcome.option == "train.lr" and len(first.search_runs) == 3
    assert seeded[0].config.train.lr == outcome.chosen * TINY_LR
    # another setting (more training samples) trains with that choice, without a search
    other = {**TINY, "dataset.n_train": 128}
    second = run_comparison(["joint"], other, tmp_path / "b", seeds=1, choices=first.search)
    saved = yaml.safe_load((tmp_path / "b" / "joint" / "seed0" / "config.yaml").read_text())
    assert saved["train"]["lr"] == outcome.chosen * TINY_LR
    assert not (tmp_path / "b" / "search").exists() and second.report_md is not None
    with pytest.raises(ConfigError, match="either searches or takes the choices"):
        run_comparison(["joint"], TINY, tmp_path / "c", search=True, choices=first.search)
    wrong = [SearchOutcome("mcr", "method.lam", (1.0,), (None,))]
    with pytest.raises(ConfigError, match="the given search choices lack joint"):
        run_comparison(["joint"], TINY, tmp_path / "c", choices=wrong)
