"""How the runs of a comparison are executed: each run trained, resumed or reused, and summed up
in one kind of summary.

The engine (:func:`~mmbalance.compare.engine.run_comparison`) plans its runs
(:class:`PlannedRun`: a label, a seed, a resolved configuration and a run directory) and hands
each batch to an :class:`Executor`, which returns one :class:`RunSummary` per run, in the order of
the runs. Every executor executes a run the same way, :func:`run_or_reuse`:

- a run directory that holds a finished run of the same configuration is reused (its
  ``metrics.json``); one that holds a diverged run is not retrained (its ``diverged.json`` says
  why, and it would diverge again identically); one that holds an interrupted run is resumed;
- a run that diverges or fails with a user-facing error becomes a summary with that status, and
  the other runs go on.

The executors here: :class:`Sequential` (one run after another in this process, with progress
and an estimate of the time left) and :class:`CollectOnly` (trains nothing: the summaries of the
runs that exist, for publishing a partial regeneration). Those that fan runs out to workers
(local processes, Ray, Slurm) are in :mod:`~mmbalance.compare.executors`, over the same
:func:`run_or_reuse`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmbalance.builder.resolve import ResolvedConfig
from mmbalance.errors import DataError, MMBalanceError, TrainingDiverged
from mmbalance.io import is_written_file, read_json, write_json_atomic
from mmbalance.report import run_records, status_record

if TYPE_CHECKING:
    from mmbalance.train import Callback

#: What became of a run: it finished, its loss or weights became non-finite, it failed with a
#: user-facing error (or its process crashed), or (when collecting) it has not been run.
Status = Literal["finished", "diverged", "failed", "missing"]


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: what it is labelled in the results, its seed, its resolved
    configuration and its run directory (``title``: how progress names it)."""

    label: str
    seed: int
    config: ResolvedConfig
    run_dir: Path
    title: str = ""

    @property
    def name(self) -> str:
        return self.title or f"{self.label} seed {self.seed}"


@dataclass(frozen=True)
class RunSummary:
    """What a comparison knows of one run, whether it trained in this invocation or earlier.

    Attributes:
        label: the compared method's label.
        seed: the run's seed.
        run_dir: the run directory.
        status: finished, diverged, failed or missing (see :data:`Status`).
        metrics: final metrics per split of the validation-selected model (finished runs).
        best_epoch: the selected epoch, counted from 0 (finished runs).
        epochs_run: the epochs trained (finished runs).
        bayes_accuracy: the dataset's Bayes accuracy, where it is known.
        message: why a run did not finish.
    """

    label: str
    seed: int
    run_dir: Path
    status: Status
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    best_epoch: int | None = None
    epochs_run: int | None = None
    bayes_accuracy: float | None = None
    message: str = ""

    @classmethod
    def of_finished(cls, run: PlannedRun, summary: Mapping[str, Any]) -> RunSummary:
        """The summary of a finished run from its ``metrics.json`` content."""
        metrics = summary.get("metrics") if isinstance(summary, Mapping) else None
        if not isinstance(metrics, Mapping):
            where = str(run.run_dir / "metrics.json")
            raise DataError(f"{where!r} is not a run's metrics.json; delete it to redo the run")
        return cls(
            run.label,
            run.seed,
            run.run_dir,
            "finished",
            metrics,
            summary.get("best_epoch"),
            summary.get("epochs_run"),
            summary.get("bayes_accuracy"),
        )

    @classmethod
    def of_unfinished(cls, run: PlannedRun, status: Status, message: str) -> RunSummary:
        return cls(run.label, run.seed, run.run_dir, status, message=message)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` form of a finished run."""
        return {
            "metrics": {split: dict(values) for split, values in self.metrics.items()},
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "bayes_accuracy": self.bayes_accuracy,
        }

    def records(self) -> list[dict[str, Any]]:
        """The tidy records of the run (:func:`~mmbalance.report.run_records`), or its status
        record (:func:`~mmbalance.report.status_record`) when it did not finish."""
        if self.finished:
            return run_records(self.label, self.seed, self.to_json())
        return [status_record(self.label, self.seed, self.status, self.message)]


def run_or_reuse(run: PlannedRun, callbacks: Sequence[Callback] | None = None) -> RunSummary:
    """Reuse, resume or train one run (see the module docstring); ``callbacks`` observe its
    training (default: those of its configuration). ``run.run_dir`` must hold the same
    configuration or nothing (a comparison checks every run directory before the first run)."""
    try:
        return _run_or_reuse(run, callbacks)
    except MMBalanceError as err:  # a damaged run file, a run directory taken meanwhile
        return RunSummary.of_unfinished(run, "failed", str(err))


def _run_or_reuse(run: PlannedRun, callbacks: Sequence[Callback] | None) -> RunSummary:
    from mmbalance.train import fit
    from mmbalance.train.rundir import check_same_run

    check_same_run(run.config, run.run_dir)
    existing = existing_summary(run)
    if existing.status != "missing":
        return existing
    diverged = run.run_dir / "diverged.json"
    try:
        # A run directory that exists belongs to this comparison: resume whatever stage it
        # reached (a kill during unimodal pre-training leaves checkpoints only in ``pretrain/``).
        result = fit(run.config, run.run_dir, resume=run.run_dir.exists(), callbacks=callbacks)
    except TrainingDiverged as err:
        write_json_atomic(diverged, {"diverged": str(err)})
        return RunSummary.of_unfinished(run, "diverged", str(err))
    return RunSummary.of_finished(run, result.to_json())


def existing_summary(run: PlannedRun) -> RunSummary:
    """The summary of a run as its directory holds it, training nothing (``missing`` when it
    holds no finished or diverged run)."""
    if is_written_file(run.run_dir / "metrics.json"):
        return RunSummary.of_finished(run, read_json(run.run_dir / "metrics.json"))
    if is_written_file(run.run_dir / "diverged.json"):
        why = read_json(run.run_dir / "diverged.json")
        return RunSummary.of_unfinished(
            run, "diverged", str(why.get("diverged") if isinstance(why, dict) else why)
        )
    return RunSummary.of_unfinished(run, "missing", "not run")


class Executor(ABC):
    """Executes the runs of a comparison. An executor may run them in any order and in
    parallel, but it returns their summaries in the order of the runs, and it executes each
    one with :func:`run_or_reuse` (or, training nothing, :func:`existing_summary`)."""

    @abstractmethod
    def run(self, runs: Sequence[PlannedRun], title: str = "") -> list[RunSummary]:
        """Execute ``runs``; ``title`` names the batch in progress lines (``search: ``)."""


class Sequential(Executor):
    """One run after another in this process: each announced with a run counter and an
    estimate of the time left, and followed by its configuration's own progress display."""

    def run(self, runs: Sequence[PlannedRun], title: str = "") -> list[RunSummary]:
        from mmbalance.train.callbacks import default_callbacks

        out: list[RunSummary] = []
        clock = RunClock(len(runs))
        for i, run in enumerate(runs):
            prefix = f"[{i + 1}/{len(runs)}] {title}{run.name}"
            started = time.perf_counter()
            trained = not is_written_file(run.run_dir / "metrics.json")
            if trained and run.config.train.progress:
                print(f"{prefix}: training{clock.eta_text()}", flush=True)
            out.append(run_or_reuse(run, default_callbacks(run.config, prefix)))
            clock.finished(time.perf_counter() - started if trained else None)
        return out


class CollectOnly(Executor):
    """Trains nothing: the summary of each run as its directory holds it (a run not run yet is
    ``missing``), to publish a partial regeneration."""

    def run(self, runs: Sequence[PlannedRun], title: str = "") -> list[RunSummary]:
        return [existing_summary(run) for run in runs]


class RunClock:
    """Estimates the time a batch of runs has left from the runs it trained so far (reused runs
    take no time and are not counted)."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.durations: list[float] = []

    def finished(self, seconds: float | None) -> None:
        self.left -= 1
        if seconds is not None:
            self.durations.append(seconds)

    def eta_text(self) -> str:
        if not self.durations:
            return ""
        from mmbalance.train.callbacks import format_seconds

        mean = sum(self.durations) / len(self.durations)
        return f" (about {format_seconds(mean * self.left)} left for {self.left} runs)"


def copy_finished_run(source: Path, target: Path) -> None:
    """Reuse a finished run as another run of the same configuration (a chosen search
    candidate as the seed-0 run): copy ``source`` to ``target`` when ``target`` does not exist
    yet (into a temporary directory, then renamed: a kill leaves no half copy)."""
    import os
    import shutil
    import tempfile

    if os.path.lexists(target) or not (source / "metrics.json").is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # an unpredictable name, created exclusively: nothing can be planted under it beforehand
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        # links inside the source are copied as links, never followed
        shutil.copytree(source, partial, symlinks=True, dirs_exist_ok=True)
        os.chmod(partial, 0o777 & ~_umask())
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
