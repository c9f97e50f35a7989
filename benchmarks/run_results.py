"""Regenerate ``docs/results.md``: what every method costs and what it buys.

One command, about an hour on 2 CPU cores::

    python3 benchmarks/run_results.py                 # cost + accuracy + docs
    python3 benchmarks/run_results.py --stage docs    # rewrite the page from saved results

Stages:

* ``cost``: :mod:`benchmarks.bench_cost` (step time of every method relative to ``joint``,
  interleaved, medians; peak memory) -> ``benchmarks/results/cost_cpu.json``.
* ``accuracy``: every registered method on every study below, hyperparameters chosen on the
  validation split by the same small search for every method, then 5 seeds of the chosen
  setting -> ``benchmarks/results/accuracy.json`` (tidy records) and the run directories under
  ``--runs`` (resumable: finished runs are reused, so a killed regeneration continues).
* ``docs``: ``docs/results.md`` and its figures under ``docs/figures/``.

The search (same budget for every method): three candidate values of the method's main
hyperparameter (``SEARCH``; for methods without one, the learning rate at 0.5x, 1x and 2x the
dataset's default), each trained once (seed 0) on the study's search point, and the candidate
with the highest validation accuracy (ties: the middle value) is kept for every point and seed
of the study. The test split is never looked at before the choice is made.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import date
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` and ``mmbalance`` importable
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

# --- what is measured ----------------------------------------------------------------------------

# method -> (option, candidates); ``train.lr`` candidates multiply the dataset's default rate
SEARCH: dict[str, tuple[str, tuple[float, ...]]] = {
    "joint": ("train.lr", (0.5, 1.0, 2.0)),
    "unimodal": ("train.lr", (0.5, 1.0, 2.0)),
    "ensemble": ("train.lr", (0.5, 1.0, 2.0)),
    "unipre_frozen": ("train.lr", (0.5, 1.0, 2.0)),
    "unipre_finetuned": ("train.lr", (0.5, 1.0, 2.0)),
    "multiloss": ("method.lam_uni", (0.3, 1.0, 3.0)),
    "mcr": ("method.lam", (0.01, 0.1, 1.0)),
    "ogm": ("method.alpha", (0.1, 0.4, 0.8)),
    "ogm_ge": ("method.alpha", (0.1, 0.4, 0.8)),
    "opm": ("method.q_base", (0.3, 0.5, 0.7)),
    "mmpareto": ("method.gamma", (1.0, 1.5, 2.0)),
}
DEFAULT_SEARCH = ("train.lr", (0.5, 1.0, 2.0))
# the order of the tables: references first, then the balancing methods
ORDER = [
    "joint",
    "unimodal",
    "ensemble",
    "multiloss",
    "unipre_frozen",
    "unipre_finetuned",
    "mcr",
    "ogm",
    "ogm_ge",
    "opm",
    "mmpareto",
]
WEAK_SHARE = 0.05  # the weak modality's unique share, fixed along the sweep
SWEEP = (0.05, 0.15, 0.40)  # the strong modality's unique share


@dataclass(frozen=True)
class Point:
    """One dataset setting of a study (``x``: its position on the study's sweep axis)."""

    name: str
    overrides: Mapping[str, Any]
    x: float | None = None


@dataclass(frozen=True)
class Study:
    """A family of dataset settings searched once (at ``points[search]``) and run on 5 seeds."""

    name: str
    title: str
    description: str
    points: tuple[Point, ...]
    search: int = 0
    x_label: str = ""


def _sweep_point(share: float) -> Point:
    shares = [round(1 - share - WEAK_SHARE, 4), share, WEAK_SHARE]
    return Point(
        f"u1={share:.2f}",
        {"dataset": "synthetic", "dataset.preset": "competition", "dataset.shares": shares},
        share,
    )


STUDIES: tuple[Study, ...] = (
    Study(
        "synthetic",
        "Synthetic, 2 modalities: imbalance sweep",
        "The `competition` preset (modality 1: signal 3, depth 1; modality 2: signal 1, a depth-6 "
        "lift with leak 0.02; 1000 training samples, MLP encoders, SGD, 40 epochs). The share "
        "of samples whose label is only in the strong modality 1 grows along the sweep while "
        f"the weak modality's unique share stays at {WEAK_SHARE}; the rest is shared.",
        tuple(_sweep_point(s) for s in SWEEP),
        search=1,
        x_label="share of samples whose label is only in modality 1",
    ),
    Study(
        "synthetic3",
        "Synthetic, 3 modalities",
        "Three modalities: modality 1 easy (signal 3, depth 1), modalities 2 and 3 hard (signal "
        "1, depth-6 lifts, leak 0.02); shares: 70 % shared, 15 % unique to modality 1, 7.5 % "
        "unique to each of the others.",
        (
            Point(
                "default",
                {
                    "dataset": "synthetic",
                    "dataset.num_modalities": 3,
                    "dataset.shares": [0.7, 0.15, 0.075, 0.075],
                    "dataset.signal": [3.0, 1.0, 1.0],
                    "dataset.depth": [1, 6, 6],
                    "dataset.leak": 0.02,
                },
            ),
        ),
    ),
    Study(
        "av-digits",
        "AV-Digits",
        "Real 8x8 handwritten digits paired with espeak-ng speech of the same digit (log-mel); "
        "the dataset's default model and schedule.",
        (Point("default", {"dataset": "av-digits"}),),
    ),
    Study(
        "av-fashion",
        "AV-Fashion",
        "Fashion-MNIST paired with spoken class names at -18 dB SNR (5000 training samples); the "
        "dataset's default model and schedule.",
        (Point("default", {"dataset": "av-fashion"}),),
    ),
)


# --- jobs ----------------------------------------------------------------------------------------
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
        return json.loads(failed.read_text())
    try:
        result = run_or_reuse(resolve_config(job.overrides()), run_dir)
    except TrainingDiverged as err:
        failed.write_text(json.dumps({"diverged": str(err)}))
        return {"diverged": str(err)}
    return result if isinstance(result, dict) else result.to_json()


def load_job(job: Job, runs: Path) -> dict[str, Any]:
    """The saved outcome of a finished run, or ``{"error": "not run"}`` (nothing is trained)."""
    run_dir = runs.joinpath(*job.run_dir_parts, f"seed{job.seed}")
    for name in ("metrics.json", "diverged.json"):
        if (run_dir / name).is_file():
            return json.loads((run_dir / name).read_text())
    return {"error": "not run"}


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
    if methods is not None:
        names = [m for m in names if m in methods]
    data = build_dataset(resolve_config(dict(study.points[0].overrides)))
    return [(e.label, e.method, e.params) for e in expand_methods(names, list(data.modalities))]


def run_accuracy(
    runs: Path,
    workers: int,
    seeds: int,
    studies: Iterable[Study],
    methods: Sequence[str] | None = None,
    train: bool = True,
) -> dict[str, Any]:
    """Search, then run every method (or ``methods``) on ``seeds`` seeds; saves and returns the
    results. With ``train=False`` nothing is trained: the results are collected from the runs
    that exist (to publish a partial regeneration; the page then says how many runs are missing).
    """

    def gather(jobs: Sequence[Job], title: str) -> list[dict[str, Any]]:
        if train:
            return _execute(jobs, runs, workers, title)
        return [load_job(job, runs) for job in jobs]

    from mmbalance.build import build_dataset, resolve_config

    studies = list(studies)
    for study in studies:  # build every dataset cache once, before the workers start
        for point in study.points:
            build_dataset(resolve_config(dict(point.overrides)))
    entries = {s.name: _entries(s, methods) for s in studies}

    search_jobs: list[Job] = []
    for study in studies:
        for label, method, params in entries[study.name]:
            option, candidates = SEARCH.get(method, DEFAULT_SEARCH)
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
        base = {"study": job.study, "point": job.point.name, "x": job.point.x}
        base |= {"method": job.label, "seed": job.seed}
        if "error" in result:
            continue
        diverged = "diverged" in result
        records.append({**base, "split": "test", "metric": "diverged", "value": float(diverged)})
        if diverged:
            continue
        for split in ("val", "test"):
            for metric, value in result["metrics"][split].items():
                if split == "val" and metric != "accuracy":
                    continue
                records.append({**base, "split": split, "metric": metric, "value": value})
        if result.get("bayes_accuracy") is not None:
            bayes = result["bayes_accuracy"]
            records.append({**base, "split": "test", "metric": "bayes_accuracy", "value": bayes})
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
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(saved, indent=0))
    return saved


# --- the page ------------------------------------------------------------------------------------
def _fmt(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _point_records(saved: Mapping[str, Any], study: str, point: str) -> list[dict[str, Any]]:
    return [r for r in saved["records"] if r["study"] == study and r["point"] == point]


def _values(records: Iterable[Mapping[str, Any]], method: str, metric: str) -> list[float]:
    return [
        float(r["value"])
        for r in records
        if r["method"] == method and r["metric"] == metric and r["split"] == "test"
    ]


def accuracy_table(records: Sequence[Mapping[str, Any]], chosen: Mapping[str, str]) -> str:
    """Markdown: one row per method; mean ± std over seeds; the paired difference to joint."""
    from mmbalance.eval.report import paired_against

    methods = list(dict.fromkeys(r["method"] for r in records))
    metrics = {r["metric"] for r in records}
    probes = sorted(m for m in metrics if m.startswith("probe_accuracy_"))
    shapley = sorted(m for m in metrics if m.startswith("shapley_"))
    bayes = [float(r["value"]) for r in records if r["metric"] == "bayes_accuracy"]
    paired = paired_against(records)
    ensemble = paired_against(records, reference="ensemble")
    head = ["method", "chosen", "test accuracy"]
    head += ["gap to Bayes"] if bayes else []
    head += ["macro-F1", "Δ vs joint", "Δ vs ensemble"]
    head += [f"probe {p.removeprefix('probe_accuracy_')}" for p in probes]
    head += [f"Shapley {s.removeprefix('shapley_')}" for s in shapley]
    head += ["routing", "synergy", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def delta(table: Mapping[str, Mapping[str, Any]], method: str) -> str:
        p = table.get(method)
        if p is None:
            return "-"
        mark = " **\\***" if p["significant"] else ""
        return f"{p['mean_diff']:+.4f}{mark}"

    for method in methods:
        acc = _values(records, method, "accuracy")
        row = [f"`{method}`", chosen.get(method, "-"), _fmt(acc)]
        if bayes:
            row.append(f"{bayes[0] - statistics.fmean(acc):.4f}" if acc else "-")
        row.append(_fmt(_values(records, method, "macro_f1")))
        row += [delta(paired, method), delta(ensemble, method)]
        row += [_fmt(_values(records, method, k), 3) for k in probes + shapley]
        row += [_fmt(_values(records, method, k), 3) for k in ("routing_rate", "synergy_rate")]
        failures = _values(records, method, "diverged")
        row.append(f"{int(sum(failures))}/{len(failures)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_table(saved: Mapping[str, Any]) -> str:
    """Markdown: test accuracy (mean ± std) of every method in every study's headline setting
    (the search point), with the Bayes accuracy where it is known."""
    columns: list[tuple[str, list[dict[str, Any]]]] = []
    for study in STUDIES:
        point = study.points[study.search]
        records = _point_records(saved, study.name, point.name)
        if not records:
            continue
        bayes = [float(r["value"]) for r in records if r["metric"] == "bayes_accuracy"]
        title = study.title.split(":")[0] + (f" ({point.name})" if len(study.points) > 1 else "")
        title += f", Bayes {bayes[0]:.4f}" if bayes else ""
        columns.append((title, records))
    methods = list(dict.fromkeys(r["method"] for _, recs in columns for r in recs))
    accuracy = [{m: _values(records, m, "accuracy") for m in methods} for _, records in columns]
    best = [max((statistics.fmean(v) for v in col.values() if v), default=None) for col in accuracy]
    lines = ["| method | " + " | ".join(t for t, _ in columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))
    for method in methods:
        cells = []
        for col, top in zip(accuracy, best, strict=True):
            values = col[method]
            cell = _fmt(values)
            if values and statistics.fmean(values) == top:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(records: Sequence[Mapping[str, Any]]) -> str:
    """One honest sentence per reference: which methods beat it beyond the seed noise."""
    from mmbalance.eval.report import paired_against

    parts = []
    for ref in ("joint", "ensemble"):
        table = paired_against(records, reference=ref)
        if not table:
            continue
        better = sorted(m for m, p in table.items() if p["significant"] and p["mean_diff"] > 0)
        worse = sorted(m for m, p in table.items() if p["significant"] and p["mean_diff"] < 0)
        level = [m for m, p in table.items() if not p["significant"]]
        parts.append(
            f"Against `{ref}`: better beyond the seed noise: "
            f"{', '.join(f'`{m}`' for m in better) or 'none'}; worse: "
            f"{', '.join(f'`{m}`' for m in worse) or 'none'}; "
            f"{len(level)} within the noise."
        )
    return " ".join(parts)


def plot_sweep(saved: Mapping[str, Any], study: Study, path: Path) -> Path:
    """Gap to Bayes and the weak encoder's probe accuracy along the sweep, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in saved["records"] if r["study"] == study.name]
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [p.x for p in study.points]
    colors = plt.get_cmap("tab20").colors  # 12+ methods: the default 10-colour cycle repeats
    for index, method in enumerate(methods):
        for ax, metric in zip(axes, ("gap", "probe_accuracy_m2"), strict=True):
            means, stds = [], []
            for point in study.points:
                rec = [r for r in records if r["point"] == point.name]
                if metric == "gap":
                    bayes = _values(rec, method, "bayes_accuracy")
                    acc = _values(rec, method, "accuracy")
                    vals = [b - a for b, a in zip(bayes, acc, strict=False)]
                else:
                    vals = _values(rec, method, metric)
                means.append(statistics.fmean(vals) if vals else float("nan"))
                stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            style = "--" if method.startswith(("unimodal", "joint", "ensemble")) else "-"
            ax.errorbar(
                xs,
                means,
                yerr=stds,
                marker="os^Dv<>p*hX"[index % 11],
                color=colors[(2 * index) % 20 + (2 * index) // 20],
                capsize=2,
                linestyle=style,
                label=method,
            )
    axes[0].set_ylabel("gap to Bayes accuracy (test)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("linear-probe accuracy of the weak encoder (m2)")
    for ax in axes:
        ax.set_xlabel(study.x_label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{study.title} (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_docs(saved: Mapping[str, Any] | None, cost: Sequence[Mapping[str, Any]] | None) -> Path:
    """Write ``docs/results.md`` (and figures) from saved results."""
    import torch

    import mmbalance
    from mmbalance.compare import plot_comparison

    figures = DOCS / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    out: list[str] = [
        "# Results: what each method costs and what it buys",
        "",
        "Regenerated by one command (about an hour on 2 CPU cores):",
        "",
        "```bash",
        "python3 benchmarks/run_results.py",
        "```",
        "",
        f"Generated {date.today().isoformat()} with mmbalance {mmbalance.__version__}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, on {os.cpu_count()} CPU cores "
        f"({platform.machine()}). Everything below comes from `benchmarks/results/` "
        "(`cost_cpu.json`, `accuracy.json`); nothing is edited by hand.",
        "",
    ]
    out += _cost_section(cost)
    if saved is not None:
        out += _accuracy_sections(saved, figures, plot_comparison)
    path = DOCS / "results.md"
    path.write_text("\n".join(out) + "\n")
    return path


def _demote(markdown: str, levels: int = 2) -> str:
    """Push a standalone page's headings down so that it nests under this page's sections."""
    return "\n".join(
        "#" * levels + line if line.startswith("#") else line for line in markdown.split("\n")
    )


def _cost_section(cost: Sequence[Mapping[str, Any]] | None) -> list[str]:
    out = ["## Cost", ""]
    if not cost:
        return [
            *out,
            "No cost results yet: run `python3 benchmarks/run_results.py --stage cost`.",
            "",
        ]
    from benchmarks.bench_cost import cost_markdown

    out += [
        "Step time of each method divided by `joint`'s on the same model, batch and data, "
        "timed side by side (interleaved rounds, medians), with `Trainer.train_step`: exactly "
        "the step training runs. See `benchmarks/bench_cost.py` for the settings.",
        "",
        _demote(cost_markdown(cost)),
        "",
    ]
    # further measurements saved beside it (another device, another batch): ``cost_<name>.json``
    for extra in sorted(RESULTS.glob("cost_*.json")):
        if extra.name == "cost_cpu.json":
            continue
        out += [
            f"### Also measured: `{extra.name}`",
            "",
            _demote(cost_markdown(json.loads(extra.read_text())), 3),
            "",
        ]
    return out


def _timing(saved: Mapping[str, Any]) -> str:
    """How long the accuracy stage took, and whether runs are missing (a partial regeneration)."""
    parts = [f"{saved.get('runs', '?')} training runs"]
    if saved.get("minutes") is not None:
        parts.append(
            f"the last invocation took {saved['minutes']:.0f} min on {saved['workers']} worker "
            "processes, reusing the runs earlier invocations had finished"
        )
    if saved.get("missing"):
        parts.append(f"**partial: {saved['missing']} runs missing**")
    return ", ".join(parts)


def _accuracy_sections(saved: Mapping[str, Any], figures: Path, plot_comparison: Any) -> list[str]:
    out = [
        "## Accuracy",
        "",
        "Test accuracy in each study's headline setting (mean ± std over seeds; bold: the "
        "highest mean). The sections below give every setting, the paired differences, the "
        "probes, contributions and error analysis.",
        "",
        summary_table(saved),
        "",
        f"Every method on {saved['seeds']} seeds per setting (mean ± std over seeds; "
        f"{_timing(saved)}). Hyperparameters "
        "were chosen on the validation split only: each method had the same budget of three "
        "candidate values of its main hyperparameter, one run each (seed 0) at the study's "
        "search point; the table's *chosen* column gives the winner. "
        "Δ columns are paired differences of test accuracy over the same seeds; **\\*** marks a "
        "difference larger than twice its standard error (larger than the seed noise). "
        "Probes are linear probes on each frozen encoder (test split); Shapley values are each "
        "modality's contribution to test accuracy (latents permuted); routing and synergy "
        "follow the MCR paper's error analysis.",
        "",
    ]
    chosen_by: dict[str, dict[str, str]] = {}
    for s in saved["search"]:
        opt = s["option"].split(".")[-1]
        value = f"{s['chosen']:g}" + ("x" if s["option"] == "train.lr" else "")
        chosen_by.setdefault(s["study"], {})[s["method"]] = f"{opt}={value}"
    for study in STUDIES:
        if not any(r["study"] == study.name for r in saved["records"]):
            continue
        out += [f"### {study.title}", "", study.description, ""]
        if len(study.points) > 1:
            fig = plot_sweep(saved, study, figures / f"{study.name}_sweep.png")
            out += [f"![{study.title}](figures/{fig.name})", ""]
        for point in study.points:
            records = _point_records(saved, study.name, point.name)
            if not records:
                continue
            if len(study.points) > 1:
                out += [f"#### {point.name}", ""]
            out += [accuracy_table(records, chosen_by.get(study.name, {})), ""]
            out += [verdict(records), ""]
            if len(study.points) == 1 or point == study.points[study.search]:
                slug = f"{study.name}_{point.name}".replace("=", "").replace(".", "")
                fig = plot_comparison(records, figures / f"{slug}.png")
                out += [f"![{study.title} {point.name}](figures/{fig.name})", ""]
    out += ["## Hyperparameter search (validation accuracy, seed 0)", ""]
    out += [
        "| study | method | option | candidates: validation accuracy | chosen |",
        "|---|---|---|---|---|",
    ]
    for s in saved["search"]:
        scores = ", ".join(
            f"{k}: {v:.4f}" if v >= 0 else f"{k}: diverged" for k, v in s["scores"].items()
        )
        out.append(
            f"| {s['study']} | `{s['method']}` | {s['option']} | {scores} | {s['chosen']:g} |"
        )
    out.append("")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "cost", "accuracy", "docs"), default="all")
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", default="runs/results", help="run directories (resumable)")
    parser.add_argument(
        "--studies", default=",".join(s.name for s in STUDIES), help="comma-separated subset"
    )
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="accuracy stage: train nothing, collect the runs that exist under --runs",
    )
    args = parser.parse_args(argv)
    wanted = args.studies.split(",")
    unknown = set(wanted) - {s.name for s in STUDIES}
    if unknown:
        parser.error(f"unknown studies {sorted(unknown)}; known: {[s.name for s in STUDIES]}")
    cost_path, acc_path = RESULTS / "cost_cpu.json", RESULTS / "accuracy.json"
    if args.stage in ("all", "cost"):
        from benchmarks.bench_cost import run_cost

        run_cost(RESULTS, quick=False, device="cpu", threads=2)
    if args.stage in ("all", "accuracy"):
        studies = [s for s in STUDIES if s.name in wanted]
        methods = args.methods.split(",") if args.methods else None
        run_accuracy(
            Path(args.runs), args.workers, args.seeds, studies, methods, not args.collect_only
        )
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else None
    saved = json.loads(acc_path.read_text()) if acc_path.is_file() else None
    print(f"wrote {write_docs(saved, cost)}")


if __name__ == "__main__":
    main()
