"""The comparison engine: :func:`run_comparison` plans, searches, executes, records and reports a
comparison of methods over seeds; ``mmbalance compare`` and the accuracy benchmark both run
through it.

Every run is keyed by its resolved configuration. A run directory is reused (finished) or
resumed (interrupted) only if it holds the same configuration, up to the settings that cannot
change the numbers (:data:`mmbalance.config.PRESENTATION_KEYS`); otherwise the comparison is
refused, naming the differing keys. Two compared methods resolving to the same configuration
(``joint,joint``) are refused as well. All of this is checked before the first run trains, so
re-running the same comparison after a kill finishes it without redoing work, and a changed
comparison never mixes old runs into new results.

A run that diverges (or fails with another user-facing error) does not end the comparison: it is
summed up with its status (:class:`~mmbalance.compare.execute.RunSummary`), recorded in
``results.json`` as one status record, and the others go on.

The files of a comparison directory ``OUT``::

    OUT/LABEL/seedS/                     one run directory per compared method and seed
    OUT/search/LABEL/OPTION=V/seed0/     the search's candidates (with a search)
    OUT/results.json                     the tidy records of every run
    OUT/search.json                      every candidate's validation score and the choice
    OUT/report.md, OUT/report.html       the report (and its report_*.png figures)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.builder.assemble import build_dataset
from mmbalance.builder.engine import check_engine
from mmbalance.builder.resolve import ResolvedConfig, resolve_config
from mmbalance.compare.execute import (
    Executor,
    PlannedRun,
    RunSummary,
    Sequential,
    copy_finished_run,
)
from mmbalance.compare.methods import (
    ComparedMethod,
    expand_methods,
    method_options,
    parse_method_spec,
    refuse_same_runs,
    shared_options,
)
from mmbalance.compare.search import (
    Candidate,
    SearchOutcome,
    config_with_value,
    search_candidates,
)
from mmbalance.errors import ConfigError, shown
from mmbalance.io import claim_output, output_lock, remove_stale_temporaries, write_json_atomic
from mmbalance.methods import METHODS
from mmbalance.report import ResultSet


@dataclass
class Comparison:
    """What a comparison did: :func:`run_comparison` and :func:`mmbalance.api.compare` return
    it.

    Attributes:
        out: the comparison directory.
        methods: the compared methods, in the order of the results.
        runs: the summary of every seeded run, method by method, seed by seed.
        search: the search of every compared method (empty without a search).
        search_runs: the summary of every candidate's run, method by method.
        records: the tidy records of every run (``results.json``: ``method``, ``seed``,
            ``split``, ``metric``, ``value``; status records for runs that did not finish).
        report_md: ``OUT/report.md`` (None when no report was written: none asked for, or no
            run finished).
        report_html: ``OUT/report.html`` (None likewise).
        table: the comparison table as plain text that fits 80 columns, what ``mmbalance
            compare`` prints ("" without a report).
    """

    out: Path
    methods: list[ComparedMethod]
    runs: list[RunSummary]
    search: list[SearchOutcome] = field(default_factory=list)
    search_runs: list[RunSummary] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    report_md: Path | None = None
    report_html: Path | None = None
    table: str = ""

    @property
    def results(self) -> Path:
        """``OUT/results.json``."""
        return self.out / "results.json"

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The status records of the runs that did not finish."""
        return [r for s in self.runs if not s.finished for r in s.records()]

    @property
    def figure(self) -> Path | None:
        """The report's comparison figure (None without a report, or when no run has a test
        score)."""
        from mmbalance.report.page import COMPARISON_FIGURE

        path = self.out / COMPARISON_FIGURE
        return path if self.report_md is not None and path.is_file() else None

    def result_set(self) -> ResultSet:
        """The records and run directories of the comparison, as a report reads them."""
        runs = {(r.label, r.seed): r.run_dir for r in self.runs if r.run_dir.is_dir()}
        return ResultSet(self.out, self.records, runs)


#: The most seeds a comparison runs per method.
MAX_SEEDS = 1000


def run_comparison(
    methods: Sequence[str],
    overrides: Mapping[str, Any],
    out_dir: str | Path,
    *,
    seeds: int = 3,
    search: bool = False,
    choices: Sequence[SearchOutcome] = (),
    executor: Executor | None = None,
    report: bool = True,
    metrics: Sequence[str] | None = None,
) -> Comparison:
    """Train (or reuse) every compared method on ``seeds`` seeds into ``out_dir`` and write its
    results (see the module docstring for the files).

    Args:
        methods: method names, variants (``ogm_ge[alpha=1.2]``) and named sets, as
            ``--methods`` gives them (:func:`~mmbalance.compare.methods.split_methods` splits
            its text).
        overrides: the configuration every run shares (flat keys: ``dataset``,
            ``train.epochs``, ...); ``method.KEY`` options apply to every compared method that
            has an option ``KEY``.
        out_dir: the comparison directory.
        seeds: seeds per compared method (0 .. seeds - 1).
        search: first choose each method's main option on the validation split
            (:mod:`~mmbalance.compare.search`; seed 0, the test split is never looked at), then
            train the seeds with the chosen value; ``search.json`` records the choices.
        choices: the search outcomes of another comparison of the same methods (another
            setting of the same study) to train with, instead of searching here.
        executor: how the runs are executed (default:
            :class:`~mmbalance.compare.execute.Sequential`, one after another in this process).
        report: write ``report.md`` and ``report.html`` (and the terminal table,
            :attr:`Comparison.table`) when some run finished.
        metrics: the columns of the report and the table (``--metrics``, parsed by
            :func:`~mmbalance.report.parse_metrics`); the first is compared with the reference.

    Every method name, option, engine setting and existing run directory is checked before the
    first run trains (one-line :class:`~mmbalance.errors.ConfigError`). The comparison
    directory is marked as mmbalance's (:func:`~mmbalance.io.claim_output`) and written under
    its lock (:func:`~mmbalance.io.output_lock`).
    """
    if not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be in [1, {MAX_SEEDS}], got {shown(seeds)}")
    if not methods:
        raise ConfigError("--methods names no method")
    if search and choices:
        raise ConfigError("a comparison either searches or takes the choices of another one")
    out_dir = Path(out_dir)
    for spec in methods:  # every name is checked before any module is imported
        METHODS.require(parse_method_spec(spec)[0])
    data = build_dataset(resolve_config(shared_options(overrides)))
    compared = expand_methods(methods, list(data.modalities))
    labels = [m.label for m in compared]
    options = method_options(compared, overrides)
    plans: list[list[Candidate]] = []
    if search:
        plans = [search_candidates(m, o, out_dir) for m, o in zip(compared, options, strict=True)]
        planned = [c.config for plan in plans for c in plan if c.config is not None]
        refuse_same_runs(labels, [[_identity(c.config) for c in plan] for plan in plans])
    else:
        configs = _configs_with_choices(compared, options, choices)
        refuse_same_runs(labels, [c.identity() for c in configs])
        planned = configs
    # training is imported once every name and option is known to be valid (fast errors)
    from mmbalance.train.rundir import check_same_run

    for cfg in planned:
        check_engine(cfg)
    executor = executor if executor is not None else Sequential()
    claim_output(out_dir, "comparison")
    with output_lock(out_dir):
        remove_stale_temporaries(out_dir, ["results.json", "search.json"])
        searched: list[SearchOutcome] = []
        search_runs: list[RunSummary] = []
        if search:
            configs, searched, search_runs = _search(compared, plans, out_dir, data.task, executor)
        runs = [
            PlannedRun(m.label, seed, cfg.with_train(seed=seed), out_dir / m.label / f"seed{seed}")
            for m, cfg in zip(compared, configs, strict=True)
            for seed in range(seeds)
        ]
        for run in runs:
            check_same_run(run.config, run.run_dir)
        summaries = executor.run(runs)
        records = [r for s in summaries for r in s.records()]
        write_json_atomic(out_dir / "results.json", records, indent=1)
        comparison = Comparison(out_dir, compared, summaries, searched, search_runs, records)
        if report and any(s.finished for s in summaries):
            _write_report(comparison, metrics)
    return comparison


def _identity(config: ResolvedConfig | None) -> dict[str, Any] | None:
    return config.identity() if config is not None else None


def _search(
    compared: Sequence[ComparedMethod],
    plans: Sequence[Sequence[Candidate]],
    out_dir: Path,
    task: str,
    executor: Executor,
) -> tuple[list[ResolvedConfig], list[SearchOutcome], list[RunSummary]]:
    """Run every method's search (``plans``: its candidates) and return the chosen
    configurations (seed 0), the outcomes and the candidates' runs; the chosen candidate's
    finished run becomes the method's seed-0 run. A refused candidate is not run and never
    wins."""
    from mmbalance.eval.metrics import selection_key
    from mmbalance.train.rundir import check_same_run

    runs = [
        PlannedRun(c.label, 0, c.config, c.run_dir, f"{c.label} {c.option}={c.value:g}")
        for plan in plans
        for c in plan
        if c.config is not None
    ]
    for run in runs:
        check_same_run(run.config, run.run_dir)
    summaries = executor.run(runs, "search: ")
    ahead = iter(summaries)
    chosen, outcomes = [], []
    for method, plan in zip(compared, plans, strict=True):
        done = [next(ahead) if c.config is not None else None for c in plan]
        scores = tuple(
            selection_key(dict(s.metrics["val"]), task) if s is not None and s.finished else None
            for s in done
        )
        outcome = SearchOutcome(
            method.label,
            plan[0].option,
            tuple(c.value for c in plan),
            scores,
            tuple(c.refusal for c in plan),
        )
        best = plan[outcome.chosen_index]
        assert best.config is not None  # a refused value is never chosen
        chosen.append(best.config)
        outcomes.append(outcome)
        copy_finished_run(best.run_dir, out_dir / method.label / "seed0")
        if best.config.train.progress:
            print(f"search: {method.label}: {best.option}={best.value:g}", flush=True)
    write_json_atomic(out_dir / "search.json", [o.to_json() for o in outcomes], indent=1)
    return chosen, outcomes, summaries


def _configs_with_choices(
    compared: Sequence[ComparedMethod],
    options: Sequence[Mapping[str, Any]],
    choices: Sequence[SearchOutcome],
) -> list[ResolvedConfig]:
    """Every method's configuration: its options, with the value another comparison's search
    chose where ``choices`` are given."""
    if not choices:
        return [resolve_config(o) for o in options]
    by_label = {c.label: c for c in choices}
    missing = [m.label for m in compared if m.label not in by_label]
    if missing:
        raise ConfigError(f"the given search choices lack {', '.join(missing)}")
    return [
        config_with_value(o, by_label[m.label].option, by_label[m.label].chosen)
        for m, o in zip(compared, options, strict=True)
    ]


def _write_report(comparison: Comparison, metrics: Sequence[str] | None) -> None:
    """Write the report and the terminal table (``metrics``: the picked columns of
    ``--metrics``, the first of which the table compares with the reference)."""
    from mmbalance.report import (
        comparison_table,
        epoch_seconds,
        expand_metrics,
        metrics_table,
        to_text,
        write_report,
    )

    results = comparison.result_set()
    seconds = epoch_seconds(results.histories())
    compared = expand_metrics(metrics, comparison.records)[0] if metrics else None
    table = comparison_table(comparison.records, epoch_seconds=seconds, compared=compared)
    comparison.table = to_text(table)
    if metrics:
        comparison.table += f"\n\n{to_text(metrics_table(comparison.records, metrics))}"
    comparison.report_md, comparison.report_html = write_report(results, metrics=metrics)
