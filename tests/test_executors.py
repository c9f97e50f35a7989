"""Comparisons on an executor: local processes, Ray and Slurm (through submitit's local
executor) give the records of ``local`` to the last digit and the same run directories; a
killed worker is reported, retried, and its run resumes from its checkpoint while the other
runs go on; a missing extra and bad options are one-line errors.

Float sums depend on torch's thread count, so the reference ``local`` comparison trains with the
one thread that every worker here gets. Ray starts once for the module (it is slow to start)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY

from mmbalance import api
from mmbalance.cli import main
from mmbalance.compare import (
    ExecutorOptions,
    Local,
    PlannedRun,
    ProcessPool,
    RayPool,
    SlurmPool,
    WorkerPool,
    make_executor,
    run_or_reuse,
)
from mmbalance.errors import ConfigError

METHODS = "joint,mcr"


def _files(out: Path) -> dict[str, list[str]]:
    """Every run directory's file names (times and contents aside)."""
    return {
        str(run.relative_to(out)): sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        for run in sorted(out.glob("*/seed*"))
    }


def _records(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """The ``local`` comparison every executor must reproduce."""
    out = tmp_path_factory.mktemp("local")
    api.compare(METHODS, out=out, seeds=1, overrides=TINY, executor="local", report=False)
    return out


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_ray_gives_the_records_of_local(
    reference: Path, tmp_path: Path, ray_local: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    done = api.compare(METHODS, out=tmp_path, seeds=1, overrides=TINY, executor="ray")
    output = capsys.readouterr().out
    sys.__stdout__.write(f"\n--- ray ---\n{output}\n")  # the Ray run's lines, shown with -s
    assert _records(tmp_path) == _records(reference)
    assert _files(tmp_path) == _files(reference)
    assert done.report_md is not None and "mcr seed 0: finished" in output


def test_slurm_through_submitits_local_executor(reference: Path, tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    executor = SlurmPool(tmp_path / "slurm", time=5, cluster="local")
    api.compare("joint", out=tmp_path, seeds=1, overrides=TINY, executor=executor, report=False)
    assert _records(tmp_path) == [r for r in _records(reference) if r["method"] == "joint"]
    assert len(list((tmp_path / "slurm").glob("*_log.out"))) == 1  # one job per run
    built = make_executor("slurm", ExecutorOptions(slurm_partition="gpu", slurm_time=30), "o")
    assert isinstance(built, SlurmPool) and built.folder == Path("o") / "slurm"
    assert (built.partition, built.time) == ("gpu", 30)


#: A plugin that, in a worker process, SIGKILLs the joint run once right after its epoch 0 (its
#: metrics and last.ckpt written), and logs every epoch a process finished.
KILLER = """
import os
import signal
from pathlib import Path

from mmbalance.train.callbacks import MetricsFiles

_MARK = Path(os.environ["KILL_ONCE_MARK"])
_PARENT = int(os.environ["KILL_ONCE_PARENT"])
_original = MetricsFiles.on_epoch_end


def _on_epoch_end(self, trainer, row):
    _original(self, trainer, row)
    name = trainer.cfg.method.name
    with open(_MARK.with_suffix(".log"), "a") as log:
        log.write(f"{name} {row['epoch']} {os.getpid()}\\n")
    if name == "joint" and os.getpid() != _PARENT and not _MARK.exists():
        _MARK.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


MetricsFiles.on_epoch_end = _on_epoch_end
"""


def test_processes_give_the_records_of_local_and_a_killed_run_resumes(
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_registries: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two processes; the joint run's worker is SIGKILLed once after its epoch, the mcr run
    goes on; the retry resumes from last.ckpt (it trains no epoch again) and every record and
    run directory is that of ``local``. Run again, every run is reused."""
    from mmbalance.train.callbacks import MetricsFiles

    monkeypatch.setattr(MetricsFiles, "on_epoch_end", MetricsFiles.on_epoch_end)  # restored
    plugin = tmp_path / "kill_once.py"
    plugin.write_text(KILLER)
    mark = tmp_path / "mark"
    monkeypatch.setenv("KILL_ONCE_MARK", str(mark))
    monkeypatch.setenv("KILL_ONCE_PARENT", str(os.getpid()))
    out = tmp_path / "cmp"
    args: dict[str, Any] = {"seeds": 1, "overrides": TINY, "report": False}
    executor = ProcessPool(jobs=2, threads=1)
    api.compare(METHODS, out=out, executor=executor, plugins=[str(plugin)], **args)
    assert mark.exists(), "the worker was never killed"
    captured = capsys.readouterr()
    assert "joint seed 0: worker killed by SIGKILL; retry 1 of 2" in captured.err
    assert sorted(line.split(" ")[0] for line in captured.out.splitlines()) == ["[1/2]", "[2/2]"]
    epochs = [line.split() for line in mark.with_suffix(".log").read_text().splitlines()]
    assert sorted((name, int(e)) for name, e, _ in epochs) == [("joint", 0), ("mcr", 0)]
    assert _records(out) == _records(reference)
    assert _files(out) == _files(reference)
    api.compare(METHODS, out=out, executor=executor, **args)  # all reused: no worker, no line
    assert capsys.readouterr().out == ""
    assert _records(out) == _records(reference)


class Flaky(WorkerPool):
    """A worker backend in this process whose worker dies ``deaths[label]`` times before it
    executes a run: the retry policy without processes."""

    def __init__(self, deaths: dict[str, int], retries: int) -> None:
        super().__init__(jobs=2, retries=retries)
        self.deaths = dict(deaths)
        self.handed: list[str] = []

    def submit(self, run: PlannedRun) -> Any:
        self.handed.append(run.label)
        return Handle(run)

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, Any]]:
        handle = handles[0]
        if self.deaths.get(handle.run.label, 0) > 0:
            self.deaths[handle.run.label] -= 1
            return [(handle, "killed by SIGKILL")]
        return [(handle, run_or_reuse(handle.run))]


class Handle:
    def __init__(self, run: PlannedRun) -> None:
        self.run = run


def test_a_worker_that_keeps_dying_fails_its_run_only_after_the_retries(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flaky = Flaky({"joint": 2}, retries=1)
    done = api.compare(METHODS, out=tmp_path, seeds=1, overrides=TINY, executor=flaky)
    assert flaky.handed == ["joint", "mcr", "joint"]  # retried once, while mcr went on
    (record,) = done.failed
    assert (record["method"], record["value"]) == ("joint", "failed")
    assert record["message"] == "worker killed by SIGKILL"
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "joint seed 0: worker killed by SIGKILL; retry 1 of 1",
        "[2/2] joint seed 0: failed: worker killed by SIGKILL",
    ]
    mcr = [r for r in _records(reference) if r["method"] == "mcr"]
    assert _records(tmp_path) == [record, *mcr]  # in the order of the runs
    assert done.report_md is not None  # the report of the runs that finished

    again = Flaky({"joint": 2}, retries=2)
    api.compare(METHODS, out=tmp_path, seeds=1, overrides=TINY, executor=again, report=False)
    assert again.handed == ["joint", "joint", "joint"]  # mcr reused; joint's third try trains
    assert _records(tmp_path) == _records(reference)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--executor", "dask"],
            "unknown executor 'dask'; executors: local, processes, ray, slurm",
        ),
        (["--executor", "processes", "--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--executor", "processes", "--retries", "-1"], "--retries must be >= 0, got -1"),
        (["--executor", "slurm", "--slurm-time", "0"], "--slurm-time must be >= 1, got 0"),
        (["--jobs", "2"], "--jobs applies to --executor processes/ray/slurm, not local"),
        (
            ["--executor", "processes", "--ray-address", "auto"],
            "--ray-address applies to --executor ray, not processes",
        ),
        (
            ["--executor", "ray", "--slurm-partition", "gpu"],
            "--slurm-partition applies to --executor slurm, not ray",
        ),
    ],
)
def test_bad_executor_options_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    code = main(
        ["compare", "--dataset", "synthetic", "--methods", "joint", "--out", str(out), *argv]
    )
    err = capsys.readouterr().err
    assert code == 2 and err == f"mmbalance: error: {message}\n"
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("name", "module", "extra"), [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")]
)
def test_a_missing_extra_is_one_line_naming_it(
    name: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as err:
        make_executor(name, None, "out")
    assert str(err.value) == f"this executor needs {module}: pip install 'mmbalance[{extra}]'"


def test_executors_by_name_and_the_thread_share() -> None:
    assert isinstance(make_executor("local", None, "o"), Local)
    pool = make_executor("processes", ExecutorOptions(jobs=2, retries=3), "o")
    assert isinstance(pool, ProcessPool) and (pool.jobs, pool.retries) == (2, 3)
    assert pool.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    pytest.importorskip("ray")
    ray = make_executor("ray", ExecutorOptions(ray_address="auto", gpus_per_run=1), "o")
    assert isinstance(ray, RayPool) and (ray.address, ray.gpus_per_run, ray.jobs) == (
        "auto",
        1,
        None,
    )
    with pytest.raises(ConfigError, match="unknown executor option 'job'"):
        api.compare("joint", out="o", executor="processes", executor_options={"job": 2})
