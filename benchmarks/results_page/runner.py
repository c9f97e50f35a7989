"""Running the accuracy benchmark through the comparison engine: for every study, one
comparison (:func:`mmbalance.compare.run_comparison`) with the validation search at the study's
search point, then one comparison per other point with the choices of that search; the runs go
to a pool of processes (one torch thread each).

Runs are resumable: a run directory under ``runs/STUDY/POINT`` that holds ``metrics.json`` (or
``diverged.json``) is reused, so a killed regeneration continues where it stopped. With
``train=False`` nothing is trained and the results are collected from the runs that exist.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.results_page import RESULTS
from benchmarks.results_page.studies import ORDER, Study
from mmbalance.io import read_json, write_json_atomic
from mmbalance.report import DIVERGED, run_records
from mmbalance.report.records import read_history

if TYPE_CHECKING:
    from mmbalance.compare import Executor

#: the ``metrics.csv`` columns kept as per-modality curves (validation probes and Shapley values)
CURVE_PREFIXES = ("val_probe_acc_", "val_shapley_", "val_head_acc_")


def with_sample_counts(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``summary`` with the numbers of test samples behind the routing and synergy rates
    (``routing_samples``: some unimodal predictor right; ``synergy_samples``: none right), read
    from the run's ``analysis.json``, so that the page can show what each rate rests on."""
    analysis = run_dir / "analysis.json"
    if "metrics" not in summary or not analysis.is_file():
        return summary
    content = read_json(analysis)
    errors = content.get("errors") if isinstance(content, dict) else None
    if not isinstance(errors, dict) or "n" not in errors or "groups" not in errors:
        return summary
    none = int(errors["groups"].get("none", {}).get("count", 0))
    test = {**summary["metrics"]["test"], "routing_samples": int(errors["n"]) - none}
    test["synergy_samples"] = none
    return {**summary, "metrics": {**summary["metrics"], "test": test}}


def with_beyond_accuracy(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``summary`` with the metrics runs record beyond accuracy (balanced accuracy, ECE,
    robustness to a missing or noisy modality): a run trained before runs recorded them gets
    them from its selected weights (:func:`mmbalance.train.runner.beyond_accuracy_metrics`),
    kept in ``beyond_accuracy.json`` next to its ``metrics.json`` so that they are computed
    once; metrics the run recorded itself are never replaced."""
    from mmbalance.eval.robustness import summary_key

    if "metrics" not in summary or summary_key(0.5) in summary["metrics"]["test"]:
        return summary
    saved = run_dir / "beyond_accuracy.json"
    if saved.is_file():
        extra = read_json(saved)
    else:
        from mmbalance.train.runner import beyond_accuracy_metrics

        extra = beyond_accuracy_metrics(run_dir)
        write_json_atomic(saved, extra)
    test = {**extra, **summary["metrics"]["test"]}
    return {**summary, "metrics": {**summary["metrics"], "test": test}}


def study_methods(study: Study, methods: Sequence[str] | None = None) -> list[str]:
    """The methods a study compares, as ``--methods`` names them: every registered method (or
    the study's own list, or ``methods``) in the order of the tables, a study's variants
    (``opm[warmup_epochs=1]``) in place of their methods."""
    from mmbalance.methods import METHODS

    registered = list(METHODS.names())
    names = [m for m in ORDER if m in registered] + sorted(set(registered) - set(ORDER))
    if study.methods is not None:
        names = [m for m in names if m in study.methods]
    if methods is not None:
        names = [m for m in names if m in methods]
    return [study.variants.get(m, m) for m in names]


def point_records(study: Study, point_index: int, comparison: Any) -> list[dict[str, Any]]:
    """The page's records of one point's runs: the test metrics and the validation accuracy,
    whether each run diverged (0 or 1), the test samples behind the routing and synergy rates,
    and the metrics beyond accuracy of a run trained before runs recorded them
    (:func:`with_beyond_accuracy`); a run that failed or was not run has none."""
    point = study.points[point_index]
    base = {"study": study.name, "point": point.name, "x": point.x}
    out: list[dict[str, Any]] = []
    for run in comparison.runs:
        if run.status == "finished":
            summary = with_sample_counts(run.to_json(), run.run_dir)
            summary = with_beyond_accuracy(summary, run.run_dir)
            rows = run_records(run.label, run.seed, summary)
            ok = {"method": run.label, "seed": run.seed, "split": "test", "metric": DIVERGED}
            rows.insert(0, {**ok, "value": 0.0})
        elif run.status == "diverged":
            rows = run_records(run.label, run.seed, {DIVERGED: run.message})
        else:
            continue
        # the validation split only for the accuracy the search used
        out += [{**base, **r} for r in rows if r["split"] == "test" or r["metric"] == "accuracy"]
    return out


def run_curves(comparison: Any) -> dict[str, list[dict[str, float]]]:
    """The per-epoch per-modality validation curves of every run, ``{"LABEL|SEED": rows}``."""
    curves: dict[str, list[dict[str, float]]] = {}
    for run in comparison.runs:
        rows = read_history(run.run_dir / "metrics.csv")
        kept = [
            {
                k: v
                for k, v in r.items()
                if k in ("epoch", "seconds") or k.startswith(CURVE_PREFIXES)
            }
            for r in rows
        ]
        if kept:
            curves[f"{run.label}|{run.seed}"] = kept
    return curves


def run_accuracy(
    runs: Path,
    workers: int,
    seeds: int,
    studies: Iterable[Study],
    methods: Sequence[str] | None = None,
    train: bool = True,
    results: Path = RESULTS,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Search, then run every method (or ``methods``) on ``seeds`` seeds of every point of
    every study; saves the results to ``results/accuracy.json`` and returns them. The runs go
    to ``executor`` (default: ``workers`` local processes, or this process for one). With
    ``train=False`` nothing is trained: the results are collected from the runs that exist (to
    publish a partial regeneration; the page then says how many runs are missing)."""
    from mmbalance.compare import CollectOnly, ProcessPool, Sequential, run_comparison

    if not train:
        executor = CollectOnly()
    elif executor is None:
        executor = ProcessPool(workers) if workers > 1 else Sequential()
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    searches: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    trained, missing = 0, 0
    for study in studies:
        names = study_methods(study, methods)
        order = [study.search, *(i for i in range(len(study.points)) if i != study.search)]
        choices: Sequence[Any] = ()
        for i in order:
            point = study.points[i]
            done = run_comparison(
                names,
                {**point.overrides, "train.progress": False},
                runs / study.name / point.name,
                seeds=seeds,
                search=i == study.search,
                choices=choices,
                executor=executor,
                report=False,
            )
            records += point_records(study, i, done)
            summaries = list(done.runs)
            if i == study.search:
                choices = done.search
                searches += [{"study": study.name, **o.to_json()} for o in done.search]
                curves[study.name] = run_curves(done)
                # each method's seed 0 is its chosen candidate's run, counted once
                summaries = [r for r in summaries if r.seed != 0]
                summaries += done.search_runs
            trained += len(summaries)
            missing += sum(r.status in ("failed", "missing") for r in summaries)
    saved = {
        "seeds": seeds,
        "runs": trained,
        "missing": missing,
        "workers": workers,
        "minutes": (time.perf_counter() - started) / 60 if train else None,
        "search": searches,
        "records": records,
        "curves": curves,
    }
    path = results / "accuracy.json"
    results.mkdir(parents=True, exist_ok=True)
    saved = merge_saved(read_json(path) if path.is_file() else None, saved)
    write_json_atomic(path, saved, indent=0)
    return saved


def merge_saved(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` (one invocation's studies) over ``previous``: the studies it ran replace theirs,
    the others are kept, so that a subset of the studies can be regenerated on its own. The
    per-invocation counts (seeds, runs, minutes) are kept per study under ``"studies"``."""
    ran = {r["study"] for r in new["records"]} | {s["study"] for s in new["search"]}
    info = {k: new[k] for k in ("seeds", "runs", "missing", "workers", "minutes")}
    studies: dict[str, Any] = {}
    if previous is not None:
        old_info = {k: previous.get(k) for k in info}
        for r in previous["records"]:
            studies.setdefault(r["study"], old_info)
        studies.update(previous.get("studies", {}))
    studies = {k: v for k, v in studies.items() if k not in ran} | dict.fromkeys(sorted(ran), info)
    keep = previous is not None
    return {
        **info,
        "runs": sum(int(v["runs"] or 0) for v in studies.values()),
        "missing": sum(int(v["missing"] or 0) for v in studies.values()),
        "studies": studies,
        "search": [
            *(s for s in (previous["search"] if keep else []) if s["study"] not in ran),
            *new["search"],
        ],
        "records": [
            *(r for r in (previous["records"] if keep else []) if r["study"] not in ran),
            *new["records"],
        ],
        "curves": {
            **{
                k: v
                for k, v in (previous.get("curves", {}) if keep else {}).items()
                if k not in ran
            },
            **new.get("curves", {}),
        },
    }
