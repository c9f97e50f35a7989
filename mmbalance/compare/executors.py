"""Executors that fan the runs of a comparison out to workers: local processes, a Ray cluster,
a Slurm queue (through submitit); and the registry that ``--executor`` names them by.

Every executor here is a :class:`WorkerPool`: a run whose directory already holds its outcome
(finished or diverged) is summed up here, without a worker; every other run goes to a worker,
which executes it with :func:`~mmbalance.compare.execute.run_or_reuse`, exactly as ``local``
does (a run directory that exists is resumed from its ``last.ckpt``). So every run stays a run
directory with the same contents, and the records, the report, reuse and resume are those of
``local``. At most ``jobs`` runs are out at once. A worker that fails (an exception that is not
a user-facing error) or is killed is reported in one line and its run is handed out again, up
to ``retries`` times, while the other runs go on; then the run is summed up as ``failed``. Each
finished run prints one line with the run counter and an estimate of the time left, from the
runs trained so far wherever they trained.

The executors, by ``--executor`` name (:data:`EXECUTORS`):

- ``local`` (:class:`Local`): one run after another in this process (the default);
- ``processes`` (:class:`ProcessPool`): ``jobs`` spawned processes on this machine, each with
  its share of the CPU threads (``cores // jobs``);
- ``ray`` (:class:`RayPool`): one Ray task per run, on a local Ray instance or the cluster at
  ``ray_address`` (``pip install mmbalance[ray]``);
- ``slurm`` (:class:`SlurmPool`): one submitit job per run (``pip install mmbalance[slurm]``),
  submitit's files in ``OUT/slurm/``.

A worker first loads the plugins that this process loaded (as DDP workers do), so it sees the
same components. Objects given to the Python API without a plugin exist in this process only:
compare them with ``local``.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, ClassVar

from mmbalance.compare.execute import Executor, PlannedRun, RunSummary, Sequential, run_or_reuse
from mmbalance.errors import ConfigError

#: What a worker's end is: the run's summary, or why the worker gave none (one line).
Outcome = RunSummary | str


@dataclass(frozen=True)
class ExecutorOptions:
    """The executor options of ``mmbalance compare`` (None: not given, the executor's default).

    Attributes:
        jobs: runs at once (``processes``: default 2; ``ray``, ``slurm``: default all).
        retries: how many times a failed or killed worker's run is handed out again (default 2).
        ray_address: the Ray cluster (default: a local Ray instance).
        slurm_partition: the Slurm partition.
        slurm_time: each run's Slurm time limit in minutes.
        gpus_per_run: GPUs each run asks for (``ray``, ``slurm``; default 0).
    """

    jobs: int | None = None
    retries: int | None = None
    ray_address: str | None = None
    slurm_partition: str | None = None
    slurm_time: int | None = None
    gpus_per_run: int | None = None

    def given(self) -> list[str]:
        """The names of the options given."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


#: ``--executor`` name -> executor class (see :func:`register_executor`).
EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    """Register an executor class under ``name``; the class has ``options`` (the
    :class:`ExecutorOptions` fields it takes) and ``from_options(options, out)``."""

    def decorator(cls: type[Executor]) -> type[Executor]:
        EXECUTORS[name] = cls
        return cls

    return decorator


def make_executor(name: str, options: ExecutorOptions | None, out: str | Path) -> Executor:
    """The executor ``--executor name`` with ``options`` for the comparison directory ``out``;
    an unknown name, an option that the executor does not take, a bad value or a missing
    optional dependency is a one-line :class:`~mmbalance.errors.ConfigError`."""
    options = options or ExecutorOptions()
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; executors: {', '.join(EXECUTORS)}")
    cls = EXECUTORS[name]
    taken: tuple[str, ...] = getattr(cls, "options", ())
    for option in options.given():
        if option not in taken:
            flag = "--" + option.replace("_", "-")
            users = [n for n, c in EXECUTORS.items() if option in getattr(c, "options", ())]
            raise ConfigError(f"{flag} applies to --executor {'/'.join(users)}, not {name}")
    for option in ("jobs", "slurm_time"):
        value = getattr(options, option)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    for option in ("retries", "gpus_per_run"):
        value = getattr(options, option)
        if value is not None and value < 0:
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 0, got {value}")
    return cls.from_options(options, Path(out))  # type: ignore[attr-defined]


def require_extra(module: str, extra: str) -> Any:
    """Import the optional dependency ``module``, or a one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"this executor needs {module}: pip install 'mmbalance[{extra}]'"
        ) from None


@register_executor("local")
class Local(Sequential):
    """``--executor local``: :class:`~mmbalance.compare.execute.Sequential` (one run after
    another in this process)."""

    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_options(cls, options: ExecutorOptions, out: Path) -> Local:
        return cls()


class WorkerPool(Executor):
    """Hands each run to a worker, at most ``jobs`` at once, and hands a run out again when its
    worker failed or was killed, up to ``retries`` times (see the module docstring). A backend
    implements :meth:`submit`, :meth:`wait` and :meth:`cancel` (and :meth:`open`,
    :meth:`close` around a batch)."""

    def __init__(self, jobs: int | None = None, retries: int = 2) -> None:
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {jobs}")
        if retries < 0:
            raise ConfigError(f"--retries must be >= 0, got {retries}")
        self.jobs = jobs
        self.retries = retries

    def open(self) -> None:
        """Called before the first run of a batch is handed out."""

    def close(self) -> None:
        """Called after the last one came back (or when the batch is interrupted)."""

    @abstractmethod
    def submit(self, run: PlannedRun) -> Any:
        """Hand ``run`` to a worker; returns a handle for :meth:`wait`."""

    @abstractmethod
    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, Outcome]]:
        """Block until some of ``handles`` ended; their outcomes (a string: the worker gave
        no summary, and why)."""

    def cancel(self, handles: Sequence[Any]) -> None:
        """Stop the workers of ``handles`` (the batch was interrupted)."""

    def run(self, runs: Sequence[PlannedRun], title: str = "") -> list[RunSummary]:
        summaries: list[RunSummary | None] = [None] * len(runs)
        todo: deque[int] = deque()
        for i, run in enumerate(runs):
            if _has_outcome(run):  # finished or diverged: summed up here, no worker
                summaries[i] = run_or_reuse(run)
            else:
                todo.append(i)
        progress = _Counter(len(runs), len(runs) - len(todo), title)
        tries = [0] * len(runs)
        out: dict[Any, int] = {}
        if not todo:
            return [s for s in summaries if s is not None]
        self.open()
        try:
            while todo or out:
                while todo and (self.jobs is None or len(out) < self.jobs):
                    i = todo.popleft()
                    out[self.submit(runs[i])] = i
                for handle, outcome in self.wait(list(out)):
                    i = out.pop(handle)
                    if isinstance(outcome, RunSummary):
                        summaries[i] = outcome
                        progress.finished(runs[i], outcome)
                        continue
                    tries[i] += 1
                    if tries[i] <= self.retries:
                        print(
                            f"{title}{runs[i].name}: worker {outcome}; retry {tries[i]} of "
                            f"{self.retries}",
                            file=sys.stderr,
                            flush=True,
                        )
                        todo.append(i)
                    else:
                        failed = RunSummary.of_unfinished(runs[i], "failed", f"worker {outcome}")
                        summaries[i] = failed
                        progress.finished(runs[i], failed)
        finally:
            if out:  # interrupted
                self.cancel(list(out))
            self.close()
        return [s for s in summaries if s is not None]


def _has_outcome(run: PlannedRun) -> bool:
    return (run.run_dir / "metrics.json").is_file() or (run.run_dir / "diverged.json").is_file()


class _Counter:
    """One line per run that came back: ``[k/n] NAME: STATUS (about T left for M runs)``, the
    estimate from the runs trained so far in this batch, wherever they trained."""

    def __init__(self, total: int, done: int, title: str) -> None:
        self.total, self.done, self.title = total, done, title
        self.started = time.perf_counter()
        self.trained = 0

    def finished(self, run: PlannedRun, summary: RunSummary) -> None:
        from mmbalance.train.callbacks import format_seconds

        self.done += 1
        self.trained += 1
        left = self.total - self.done
        rate = (time.perf_counter() - self.started) / self.trained
        eta = f" (about {format_seconds(rate * left)} left for {left} runs)" if left else ""
        status = summary.status if summary.finished else f"{summary.status}: {summary.message}"
        stream = sys.stdout if summary.finished else sys.stderr
        print(
            f"[{self.done}/{self.total}] {self.title}{run.name}: {status}{eta}",
            file=stream,
            flush=True,
        )


def execute_in_worker(
    run: PlannedRun, threads: int, plugins: Sequence[tuple[str, str]]
) -> RunSummary:
    """What a worker does with a run: ``threads`` torch threads, Lightning's messages silenced,
    the parent's plugins loaded, then :func:`~mmbalance.compare.execute.run_or_reuse` with the
    run's callbacks less the progress display (the parent prints one line per run)."""
    import torch

    from mmbalance.plugins import load_specs
    from mmbalance.train.callbacks import Progress, default_callbacks

    torch.set_num_threads(max(1, threads))
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    load_specs(plugins)
    callbacks = [c for c in default_callbacks(run.config) if not isinstance(c, Progress)]
    return run_or_reuse(run, callbacks)


def _loaded_plugins() -> list[tuple[str, str]]:
    from mmbalance.plugins import loaded_specs

    return loaded_specs()


def _error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"failed: {type(err).__name__}{': ' + text[0] if text else ''}"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@register_executor("processes")
class ProcessPool(WorkerPool):
    """``--executor processes``: ``jobs`` spawned processes at once on this machine (default
    2), each training one run with ``cores // jobs`` torch threads. Each run gets a fresh
    process, so a crashed or killed one takes no other run with it; a worker dies with this
    process. ``threads`` (Python API) sets each run's torch threads instead: float sums depend on
    the thread count, so runs match another executor's to the last digit at the same count."""

    options: ClassVar[tuple[str, ...]] = ("jobs", "retries")

    def __init__(self, jobs: int | None = 2, retries: int = 2, threads: int | None = None) -> None:
        super().__init__(2 if jobs is None else jobs, retries)
        self.threads = threads or max(1, _cpu_count() // (self.jobs or 1))
        self._context = multiprocessing.get_context("spawn")

    @classmethod
    def from_options(cls, options: ExecutorOptions, out: Path) -> ProcessPool:
        return cls(options.jobs, 2 if options.retries is None else options.retries)

    def submit(self, run: PlannedRun) -> Any:
        receive, send = self._context.Pipe(duplex=False)
        args = (run, self.threads, _loaded_plugins(), os.getpid(), send)
        process = self._context.Process(target=_process_worker, args=args)
        process.start()
        send.close()
        return _Worker(process, receive)

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, Outcome]]:
        ready = wait([h.process.sentinel for h in handles] + [h.receive for h in handles])
        ended = []
        for handle in handles:
            if handle.receive in ready or handle.process.sentinel in ready:
                ended.append((handle, handle.outcome()))
        return ended

    def cancel(self, handles: Sequence[Any]) -> None:
        for handle in handles:
            handle.process.kill()
            handle.process.join()


class _Worker:
    """A spawned process executing one run, and the pipe its summary comes back on."""

    def __init__(self, process: Any, receive: Connection) -> None:
        self.process, self.receive = process, receive

    def outcome(self) -> Outcome:
        result: Outcome | None = None
        try:
            if self.receive.poll():
                result = self.receive.recv()
        except (EOFError, OSError):
            result = None
        self.process.join()
        self.receive.close()
        if result is not None:
            return result
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code} before its run ended"


def _process_worker(
    run: PlannedRun,
    threads: int,
    plugins: Sequence[tuple[str, str]],
    parent: int,
    send: Connection,
) -> None:
    from mmbalance.train.runner import _die_with_parent

    _die_with_parent(parent)  # a killed comparison leaves no run training on
    outcome: Outcome
    try:
        outcome = execute_in_worker(run, threads, plugins)
    except Exception as err:  # any failure: the parent retries the run
        outcome = _error_line(err)
    send.send(outcome)
    send.close()


@register_executor("ray")
class RayPool(WorkerPool):
    """``--executor ray``: one Ray task per run (one CPU each, ``gpus_per_run`` GPUs), on the
    Ray instance this process is connected to, else the cluster at ``address``, else a new
    local instance (stopped again at the end of each batch). The task runs with as many torch
    threads as the CPUs Ray gave it. Workers must be able to import ``mmbalance`` (and the
    plugins): on a cluster, install it on every node or pass a ``runtime_env`` to the cluster.
    Ray's own retries are off: a crashed worker is retried here, like any executor's."""

    options: ClassVar[tuple[str, ...]] = ("jobs", "retries", "ray_address", "gpus_per_run")

    def __init__(
        self,
        address: str | None = None,
        jobs: int | None = None,
        retries: int = 2,
        gpus_per_run: int = 0,
    ) -> None:
        super().__init__(jobs, retries)
        self.ray = require_extra("ray", "ray")
        self.address = address
        self.gpus_per_run = gpus_per_run
        self._started = False
        self._task: Any = None

    @classmethod
    def from_options(cls, options: ExecutorOptions, out: Path) -> RayPool:
        retries = 2 if options.retries is None else options.retries
        return cls(options.ray_address, options.jobs, retries, options.gpus_per_run or 0)

    def open(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            if self.address is None:  # a local instance, reachable from this machine only
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
            else:
                ray.init(address=self.address)
            self._started = True
        self._task = ray.remote(num_cpus=1, num_gpus=self.gpus_per_run, max_retries=0)(_ray_worker)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False

    def submit(self, run: PlannedRun) -> Any:
        return self._task.remote(run, _loaded_plugins())

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, Outcome]]:
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        ended: list[tuple[Any, Outcome]] = []
        for ref in ready:
            try:
                ended.append((ref, self.ray.get(ref)))
            except self.ray.exceptions.RayTaskError as err:
                ended.append((ref, _error_line(err.cause or err)))
            except self.ray.exceptions.RayError as err:  # the worker died: killed, out of memory
                ended.append((ref, f"died: {type(err).__name__}"))
        return ended

    def cancel(self, handles: Sequence[Any]) -> None:
        for ref in handles:
            self.ray.cancel(ref, force=True)


def _ray_worker(run: PlannedRun, plugins: Sequence[tuple[str, str]]) -> RunSummary:
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return execute_in_worker(run, int(cpus), plugins)


@register_executor("slurm")
class SlurmPool(WorkerPool):
    """``--executor slurm``: one submitit job per run, in ``partition`` with a time limit of
    ``time`` minutes and ``gpus_per_run`` GPUs; submitit's scripts and logs go to ``folder``
    (``OUT/slurm/`` from the command line). ``cluster`` is submitit's executor name:
    ``"slurm"``, or ``"local"`` to run the jobs as local processes (for tests)."""

    options: ClassVar[tuple[str, ...]] = (
        "jobs",
        "retries",
        "slurm_partition",
        "slurm_time",
        "gpus_per_run",
    )

    def __init__(
        self,
        folder: str | Path,
        partition: str | None = None,
        time: int | None = None,
        gpus_per_run: int = 0,
        jobs: int | None = None,
        retries: int = 2,
        cluster: str = "slurm",
    ) -> None:
        super().__init__(jobs, retries)
        self.submitit = require_extra("submitit", "slurm")
        self.folder = Path(folder)
        self.partition, self.time, self.gpus_per_run = partition, time, gpus_per_run
        self.cluster = cluster
        self._executor: Any = None

    @classmethod
    def from_options(cls, options: ExecutorOptions, out: Path) -> SlurmPool:
        return cls(
            out / "slurm",
            options.slurm_partition,
            options.slurm_time,
            options.gpus_per_run or 0,
            options.jobs,
            2 if options.retries is None else options.retries,
        )

    def open(self) -> None:
        try:
            executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"submitit cannot submit to {self.cluster}: {err}") from None
        settings: dict[str, Any] = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1}
        if self.time is not None:
            settings["timeout_min"] = self.time
        if self.gpus_per_run:
            settings["gpus_per_node"] = self.gpus_per_run
        if self.partition is not None:
            settings["slurm_partition"] = self.partition
        executor.update_parameters(**settings)
        self._executor = executor

    def submit(self, run: PlannedRun) -> Any:
        return self._executor.submit(execute_in_worker, run, 1, _loaded_plugins())

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, Outcome]]:
        while True:
            ended = [job for job in handles if job.done()]
            if ended:
                return [(job, self._outcome(job)) for job in ended]
            time.sleep(1.0)

    def _outcome(self, job: Any) -> Outcome:
        try:
            return job.result()
        except Exception as err:  # a failed, killed or timed-out job: its one line
            state = getattr(job, "state", "")
            return _error_line(err) + (f" (job {job.job_id} {state})" if state else "")

    def cancel(self, handles: Sequence[Any]) -> None:
        for job in handles:
            job.cancel(check=False)
