"""``mmbalance compare --search``: each entry's main option chosen on the validation split with
the same budget for every method, then the seeds trained with the choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmbalance.builder import resolve_config
from mmbalance.cli import main
from mmbalance.compare import ComparedMethod, SearchOutcome, best_candidate, search_candidates
from mmbalance.errors import ConfigError

SMALL = ["train.epochs=1", "dataset.n_train=200", "dataset.n_val=200", "dataset.n_test=200"]


def test_choice_is_the_best_validation_key_failures_lose_ties_go_to_the_middle() -> None:
    assert best_candidate([(0.7, -1.0), (0.8, -1.0), (0.9, -2.0)]) == 2
    assert best_candidate([(0.9, -1.0), (0.8, -1.0), (0.9, -2.0)]) == 0  # then minus the loss
    assert best_candidate([(0.9, -1.0), (0.9, -1.0), (0.9, -1.0)]) == 1  # a tie: the middle
    assert best_candidate([None, None, (0.1, -9.0)]) == 2  # failed runs never win
    assert best_candidate([None]) == 0
    outcome = SearchOutcome("m", "train.lr", (0.5, 1.0, 2.0), ((0.8, -1.0), (0.8, -0.5), None))
    assert outcome.chosen == 1.0
    assert outcome.to_json() == {
        "method": "m",
        "option": "train.lr",
        "scores": {"0.5": 0.8, "1": 0.8, "2": None},
        "chosen": 1.0,
    }


def test_candidates_follow_the_search_space_and_an_entry_fixing_the_option(
    tmp_path: Path,
) -> None:
    mcr = {"method": "mcr"}
    plan = search_candidates(ComparedMethod("mcr", "mcr"), mcr, tmp_path)
    assert [c.config.method.params.lam for c in plan if c.config] == [0.01, 0.1, 1.0]
    assert all(c.config and c.config.train.seed == 0 and not c.refusal for c in plan)
    assert plan[0].run_dir == tmp_path / "search" / "mcr" / "method.lam=0.01" / "seed0"
    fixed = {**mcr, "method.lam": 1.0}
    plan = search_candidates(ComparedMethod("mcr[lam=1]", "mcr", (("lam", 1.0),)), fixed, tmp_path)
    assert [c.value for c in plan] == [1.0]
    joint = {"method": "joint", "train.lr": 0.01}
    lrs = [
        c.config.train.lr
        for c in search_candidates(ComparedMethod("joint", "joint"), joint, tmp_path)
        if c.config
    ]
    assert lrs == [0.005, 0.01, 0.02]  # the configured rate at 0.5x, 1x, 2x


def test_a_refused_value_is_a_candidate_not_run_and_all_refused_is_one_line(
    tmp_path: Path,
) -> None:
    # MSLR's window of 5 or 10 epochs never acts on a 6-epoch run (its default, 5, is refused
    # on its own); the search still tries 3
    mslr = {"method": "mslr", "train.epochs": 6}
    with pytest.raises(ConfigError, match="would never act"):
        resolve_config(mslr)
    plan = search_candidates(ComparedMethod("mslr", "mslr"), mslr, tmp_path)
    assert [c.value for c in plan] == [3, 5, 10]
    assert plan[0].config is not None and plan[0].config.method.params.window == 3
    assert [c.config for c in plan[1:]] == [None, None]
    assert all("would never act" in c.refusal for c in plan[1:])
    outcome = SearchOutcome(
        "mslr",
        "method.window",
        (3, 5, 10),
        ((0.5, -1.0), None, None),
        ("", *(c.refusal for c in plan[1:])),
    )
    assert outcome.chosen == 3
    assert set(outcome.to_json()["refused"]) == {"5", "10"}
    # when no run finished, the choice is still a value that was run: the default-like one
    refused = ("", "never acts", "never acts")
    failed = SearchOutcome("mslr", "method.window", (3, 5, 10), (None, None, None), refused)
    assert failed.chosen == 3
    ran = SearchOutcome("m", "method.x", (1, 2, 3), (None, None, None), ("", "", "no"))
    assert ran.chosen == 2
    with pytest.raises(ConfigError, match=r"window=5.*the run has 3 epochs"):
        search_candidates(ComparedMethod("mslr", "mslr"), {**mslr, "train.epochs": 3}, tmp_path)


def test_compare_search_runs_the_values_a_schedule_allows(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", "synthetic", "--methods", "mslr", "--seeds", "1"]
    assert main([*argv, "--search", "--out", str(out), *SMALL, "train.epochs=6"]) == 0
    (entry,) = json.loads((out / "search.json").read_text())
    assert entry["chosen"] == 3 and entry["scores"]["5"] is None
    assert "would never act" in entry["refused"]["10"]
    assert not (out / "search" / "mslr" / "method.window=5").exists()
    saved = yaml.safe_load((out / "mslr" / "seed0" / "config.yaml").read_text())
    assert saved["method"]["window"] == 3


def test_compare_search_trains_the_seeds_with_the_validation_choice(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", "synthetic", "--methods", "joint,mcr", "--seeds", "2"]
    assert main([*argv, "--search", "--out", str(out), *SMALL]) == 0
    summary = {s["method"]: s for s in json.loads((out / "search.json").read_text())}
    mcr = summary["mcr"]
    scores = {float(k): v for k, v in mcr["scores"].items()}
    assert set(scores) == {0.01, 0.1, 1.0}
    assert scores[mcr["chosen"]] == max(scores.values())
    for seed in (0, 1):
        cfg = yaml.safe_load((out / "mcr" / f"seed{seed}" / "config.yaml").read_text())
        assert cfg["method"]["lam"] == mcr["chosen"]
        assert cfg["train"]["seed"] == seed
    # the chosen value's search run is seed 0: reused, identical metrics
    chosen_dir = out / "search" / "mcr" / f"method.lam={mcr['chosen']:g}" / "seed0"
    assert (out / "mcr" / "seed0" / "metrics.json").read_text() == (
        chosen_dir / "metrics.json"
    ).read_text()
    results = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in results} == {
        (m, s) for m in ("joint", "mcr") for s in (0, 1)
    }
    # a second invocation reuses everything
    assert main([*argv, "--search", "--out", str(out), *SMALL]) == 0
