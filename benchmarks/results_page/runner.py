"""Running the accuracy benchmark: the search on the validation split, then every method on
every seed of every study point, on a pool of processes (one torch thread each).

Runs are resumable: a run directory under ``runs`` that holds ``metrics.json`` (or
``diverged.json``) is reused, so a killed regeneration continues where it stopped. With
``train=False`` nothing is trained and the results are collected from the runs that exist.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.results_page import RESULTS
from benchmarks.results_page.studies import ORDER, Point, Study
from mmbalance.io import read_json, write_text_atomic
from mmbalance.report import DIVERGED, run_records
from mmbalance.report.records import read_history

#: the ``metrics.csv`` columns kept as per-modality curves (validation probes and Shapley values)
CURVE_PREFIXES = ("val_probe_acc_", "val_shapley_", "val_head_acc_")


@dataclass(frozen=True)
class Job:
    """One training run: a study point, a compared entry, one candidate value and a seed."""

    study: str
    point: Point
    label: str
    method: str
    params: tuple[tuple[str, Any], ...]
    option: str
    value: float
    seed: int

    @property
    def run_dir_parts(self) -> tuple[str, ...]:
        return (self.study, self.point.name, self.label, f"{self.option}={self.value:g}")

    def overrides(self) -> dict[str, Any]:
        from mmbalance.build import resolve_config

        out: dict[str, Any] = {**self.point.overrides, "method": self.method}
        out |= {f"method.{k}": v for k, v in self.params}
        if self.option == "train.lr":
            out["train.lr"] = self.value * resolve_config(out).train.lr
        else:
            out[self.option] = self.value
        return out | {"train.seed": self.seed, "train.progress": False}


@dataclass
class Selection:
    """The search outcome of one (study, entry): validation accuracy of every candidate, in
    the order of the candidates (a failed run scores -1)."""

    option: str
    scores: dict[float, float] = field(default_factory=dict)

    def best(self) -> float:
        candidates = list(self.scores)
        middle = candidates[len(candidates) // 2]
        # highest validation accuracy; ties go to the middle (default-like) value
        return max(candidates, key=lambda v: (self.scores[v], v == middle))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def run_job(job: Job, runs: Path) -> dict[str, Any]:
    """Train (or reuse) one run; returns its ``metrics.json`` content, or ``{"diverged": why}``
    when the loss became non-finite (a candidate that diverges loses the search, and a chosen
    setting that diverges on a seed is counted in the tables, not hidden)."""
    from mmbalance.build import resolve_config
    from mmbalance.compare import run_or_reuse
    from mmbalance.errors import TrainingDiverged

    run_dir = runs.joinpath(*job.run_dir_parts, f"seed{job.seed}")
    failed = run_dir / "diverged.json"
    if failed.is_file():
        return read_json(failed)
    try:
        result = run_or_reuse(resolve_config(job.overrides()), run_dir)
    except TrainingDiverged as err:
        write_text_atomic(failed, json.dumps({"diverged": str(err)}))
        return {"diverged": str(err)}
    summary = result if isinstance(result, dict) else result.to_json()
    return with_beyond_accuracy(with_sample_counts(summary, run_dir), run_dir)


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


def load_job(job: Job, runs: Path) -> dict[str, Any]:
    """The saved outcome of a finished run, or ``{"error": "not run"}`` (nothing is trained)."""
    run_dir = runs.joinpath(*job.run_dir_parts, f"seed{job.seed}")
    if (run_dir / "diverged.json").is_file():
        return read_json(run_dir / "diverged.json")
    if (run_dir / "metrics.json").is_file():
        summary = with_sample_counts(read_json(run_dir / "metrics.json"), run_dir)
        return with_beyond_accuracy(summary, run_dir)
    return {"error": "not run"}


def with_beyond_accuracy(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``summary`` with the metrics runs record beyond accuracy (balanced accuracy, ECE,
    robustness to a missing or noisy modality): a run trained before runs recorded them gets
    them from its selected weights (:func:`mmbalance.train.runner.beyond_accuracy_metrics`),
    kept in ``beyond_accuracy.json`` next to its ``metrics.json`` so that they are computed
    once; metrics the run recorded itself are never replaced."""
    from mmbalance.eval.robustness import summary_key
    from mmbalance.io import write_json_atomic

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


def _execute(jobs: Sequence[Job], runs: Path, workers: int, title: str) -> list[dict[str, Any]]:
    """Run ``jobs`` on ``workers`` processes (one torch thread each), reporting progress (a bar
    on a terminal, one line per finished run otherwise, e.g. in a log file)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    started = time.perf_counter()
    with Progress(*columns, disable=not sys.stdout.isatty()) as bar:
        task = bar.add_task(title, total=len(jobs))

        def done(i: int, result: dict[str, Any]) -> None:
            results[i] = result
            bar.advance(task)
            if not sys.stdout.isatty():
                finished = sum(r is not None for r in results)
                minutes = (time.perf_counter() - started) / 60
                where = "/".join(jobs[i].run_dir_parts)
                print(f"{title}: {finished}/{len(jobs)} {minutes:.1f} min {where}", flush=True)

        if workers <= 1:
            _init_worker()
            for i, job in enumerate(jobs):
                done(i, run_job(job, runs))
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
                futures = {pool.submit(run_job, job, runs): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    error = future.exception()
                    # one broken run must not stop the other hundreds: it is reported, it loses
                    # the search, and it is missing from the seeds of its table row
                    result = {"error": repr(error)} if error else future.result()
                    if error:
                        print(f"FAILED {'/'.join(jobs[futures[future]].run_dir_parts)}: {error!r}")
                    done(futures[future], result)
    return [r for r in results if r is not None]


def _entries(
    study: Study, methods: Sequence[str] | None = None
) -> list[tuple[str, str, tuple[tuple[str, Any], ...]]]:
    from mmbalance.build import build_dataset, resolve_config
    from mmbalance.compare import expand_methods
    from mmbalance.methods import METHODS

    registered = list(METHODS.names())
    names = [m for m in ORDER if m in registered] + sorted(set(registered) - set(ORDER))
    if study.methods is not None:
        names = [m for m in names if m in study.methods]
    if methods is not None:
        names = [m for m in names if m in methods]
    names = [study.variants.get(m, m) for m in names]
    data = build_dataset(resolve_config(dict(study.points[0].overrides)))
    return [(e.label, e.method, e.params) for e in expand_methods(names, list(data.modalities))]


def run_accuracy(
    runs: Path,
    workers: int,
    seeds: int,
    studies: Iterable[Study],
    methods: Sequence[str] | None = None,
    train: bool = True,
    results: Path = RESULTS,
) -> dict[str, Any]:
    """Search, then run every method (or ``methods``) on ``seeds`` seeds; saves the results to
    ``results/accuracy.json`` and returns them. With ``train=False`` nothing is trained: the results are collected from the runs
    that exist (to publish a partial regeneration; the page then says how many runs are missing).
    """

    def gather(jobs: Sequence[Job], title: str) -> list[dict[str, Any]]:
        if train:
            return _execute(jobs, runs, workers, title)
        return [load_job(job, runs) for job in jobs]

    from mmbalance.build import build_dataset, resolve_config
    from mmbalance.methods import METHODS

    studies = list(studies)
    for study in studies:  # build every dataset cache once, before the workers start
        for point in study.points:
            build_dataset(resolve_config(dict(point.overrides)))
    entries = {s.name: _entries(s, methods) for s in studies}

    search_jobs: list[Job] = []
    for study in studies:
        for label, method, params in entries[study.name]:
            option, candidates = METHODS.get(method).searched_option()
            point = study.points[study.search]
            for value in candidates:
                search_jobs.append(
                    Job(study.name, point, label, method, params, option, value, seed=0)
                )
    started = time.perf_counter()
    searched = gather(search_jobs, "search (validation)")
    selections: dict[tuple[str, str], Selection] = {}
    for job, result in zip(search_jobs, searched, strict=True):
        sel = selections.setdefault((job.study, job.label), Selection(job.option))
        failed = "diverged" in result or "error" in result
        sel.scores[job.value] = -1.0 if failed else float(result["metrics"]["val"]["accuracy"])

    final_jobs: list[Job] = []
    for study in studies:
        for label, method, params in entries[study.name]:
            option = selections[(study.name, label)].option
            value = selections[(study.name, label)].best()
            for point in study.points:
                for seed in range(seeds):
                    final_jobs.append(
                        Job(study.name, point, label, method, params, option, value, seed)
                    )
    finals = gather(final_jobs, f"{seeds} seeds per method")
    records: list[dict[str, Any]] = []
    for job, result in zip(final_jobs, finals, strict=True):
        if "error" in result:
            continue
        base = {"study": job.study, "point": job.point.name, "x": job.point.x}
        rows = run_records(job.label, job.seed, result)
        if DIVERGED not in result:  # every finished run says whether it diverged
            ok = {"method": job.label, "seed": job.seed, "split": "test", "metric": DIVERGED}
            rows.insert(0, {**ok, "value": 0.0})
        # the validation split only for the accuracy the search used
        records += [
            {**base, **r} for r in rows if r["split"] == "test" or r["metric"] == "accuracy"
        ]
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    for job in final_jobs:  # per-epoch per-modality validation curves of the headline setting
        study = next(st for st in studies if st.name == job.study)
        if job.point != study.points[study.search]:
            continue
        rows = read_history(runs.joinpath(*job.run_dir_parts, f"seed{job.seed}", "metrics.csv"))
        kept = [
            {
                k: v
                for k, v in r.items()
                if k in ("epoch", "seconds") or k.startswith(CURVE_PREFIXES)
            }
            for r in rows
        ]
        if kept:
            curves.setdefault(job.study, {})[f"{job.label}|{job.seed}"] = kept
    saved = {
        "seeds": seeds,
        "runs": len({(*j.run_dir_parts, j.seed) for j in [*search_jobs, *final_jobs]}),
        "missing": len(
            {
                (*j.run_dir_parts, j.seed)
                for j, r in zip([*search_jobs, *final_jobs], [*searched, *finals], strict=True)
                if "error" in r
            }
        ),
        "workers": workers,
        "minutes": (time.perf_counter() - started) / 60 if train else None,
        "search": [
            {
                "study": study,
                "method": label,
                "option": sel.option,
                "scores": {f"{v:g}": s for v, s in sel.scores.items()},
                "chosen": sel.best(),
            }
            for (study, label), sel in selections.items()
        ],
        "records": records,
        "curves": curves,
    }
    results.mkdir(parents=True, exist_ok=True)
    path = results / "accuracy.json"
    saved = merge_saved(read_json(path) if path.is_file() else None, saved)
    write_text_atomic(path, json.dumps(saved, indent=0))
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
