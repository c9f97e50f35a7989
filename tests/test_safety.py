"""Safety (issue 12, items 1 and 4-9; issue 19, comparison runs).

No code runs from a shared file, a run never mixes configurations, faults are caught, every file
is written atomically, and bad input gets one line (exit 2), never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.testing._private.utils as numpy_test_utils
import pytest
import torch
import yaml
from conftest import TINY, cli_one_line

from mmbalance.builder import resolve_config
from mmbalance.cli import main
from mmbalance.compare import run_comparison
from mmbalance.config import load_yaml
from mmbalance.errors import ConfigError, DataError, TrainingDiverged
from mmbalance.methods import METHODS
from mmbalance.train import fit
from mmbalance.train.checkpoint import load_checkpoint, rng_state, set_rng_state

#: the tiny synthetic run (three steps per epoch) as command-line ``key=value`` arguments
TINY_ARGS = [f"{k}={v}" for k, v in TINY.items() if k != "dataset"]

# Behaviour tests read files and drive the CLI, ``fit`` and ``run_comparison`` only, so that each
# also runs (and fails) against the code before its fix; helpers added by the fixes are imported
# inside the tests that exercise them.


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _args(**changes: Any) -> list[str]:
    values = {k: v for k, v in TINY.items() if k != "dataset"} | {
        k.replace("__", "."): v for k, v in changes.items()
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ogm_ge run of two epochs (trained once per module; tests copy it)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMBALANCE_CACHE", str(root / "cache"))
        fit(resolve_config({**TINY, "method": "ogm_ge", "train.epochs": 2}), root / "run")
    return root / "run"


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# --- item 1: checkpoints execute no code ---------------------------------------------------------
class _Payload:
    """A pickle gadget: unpickling it calls ``function(*args)``."""

    def __init__(self, function: Any, args: tuple[Any, ...]) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.args


def _gadgets(marker: Path) -> dict[str, Any]:
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.exec": _Payload(exec, (code,)),
        "numpy runstring": _Payload(numpy_test_utils.runstring, (code, {})),
        "inside a checkpoint": {"model": {}, "epoch": _Payload(os.system, (f"touch {marker}",))},
    }


GADGETS = ["os.system", "builtins.exec", "numpy runstring", "inside a checkpoint"]


@pytest.mark.parametrize("gadget", GADGETS)
def test_planted_checkpoint_runs_nothing_under_evaluate(capsys, run_copy, gadget) -> None:
    marker = run_copy.parent / "pwned"
    torch.save(_gadgets(marker)[gadget], run_copy / "best.ckpt")
    err = cli_one_line(capsys, ["evaluate", str(run_copy)])
    assert "was not loaded" in err
    assert not marker.exists()


@pytest.mark.parametrize("gadget", GADGETS)
def test_planted_checkpoint_runs_nothing_under_resume(capsys, run_copy, gadget) -> None:
    marker = run_copy.parent / "pwned"
    torch.save(_gadgets(marker)[gadget], run_copy / "last.ckpt")
    err = cli_one_line(
        capsys, ["train", "--out", str(run_copy), "--resume", *_args(train__epochs=3)]
    )
    assert "was not loaded" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "holds a list"),
        ("weights", "holds a str"),
        ({"epoch": 0}, "holds no model weights"),
        ({"model": [1, 2], "epoch": 0}, "does not match the run's model"),
    ],
)
def test_checkpoint_of_another_structure_is_a_one_line_error(
    capsys, run_copy, content, message
) -> None:
    torch.save(content, run_copy / "best.ckpt")
    assert message in cli_one_line(capsys, ["evaluate", str(run_copy)])
    torch.save(content, run_copy / "last.ckpt")
    err = cli_one_line(
        capsys, ["train", "--out", str(run_copy), "--resume", *_args(train__epochs=3)]
    )
    assert "checkpoint" in err


def test_own_checkpoints_pass_the_safe_load(finished_run: Path) -> None:
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(finished_run / name, weights_only=True)  # raises if anything unsafe
        assert isinstance(ckpt, dict)
    ckpt = load_checkpoint(finished_run / "last.ckpt")
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 1


def test_rng_state_round_trips_through_plain_tensors(tmp_path: Path) -> None:
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    random.gauss(0, 1)  # and one in Python's
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.randn(3), random.gauss(0, 1), random.random())
    torch.rand(5), np.random.randn(7), random.random()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.randn(3), random.gauss(0, 1), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


# --- item 4: --resume keeps the saved configuration ----------------------------------------------
def test_resume_continues_the_saved_configuration(capsys, run_copy, tmp_path) -> None:
    """An ogm_ge run resumed without --method stays ogm_ge, and adding epochs on resume gives
    exactly the run trained for that many epochs from the start."""
    assert main(["train", "--out", str(run_copy), "--resume", *_args(train__epochs=3)]) == 0
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert saved["method"]["name"] == "ogm_ge" and saved["train"]["epochs"] == 3
    fresh = fit(resolve_config({**TINY, "method": "ogm_ge", "train.epochs": 3}), tmp_path / "f")
    resumed = _json(run_copy / "metrics.json")
    assert resumed["metrics"] == json.loads(json.dumps(fresh.metrics))
    assert resumed["epochs_run"] == 3


@pytest.mark.parametrize(
    ("change", "keys"),
    [
        (["--method", "joint"], "method, method.alpha"),
        (["dataset.seed=3"], "dataset.seed"),
        (["dataset.n_train=128"], "dataset.n_train"),
        (["train.seed=5"], "train.seed"),
        (["train.lr=0.5", "train.batch_size=16"], "train.batch_size, train.lr"),
        (["method.alpha=0.3"], "method.alpha"),
        (["train.patience=2"], "train.patience"),
    ],
)
def test_resume_refuses_what_would_change_the_trained_run(capsys, run_copy, change, keys) -> None:
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    err = cli_one_line(capsys, ["train", "--out", str(run_copy), "--resume", *TINY_ARGS, *change])
    assert f"differing keys: {keys}" in err
    after = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    assert after == before  # config.yaml included: nothing is rewritten before the check


def test_resume_refuses_fewer_epochs(capsys, run_copy) -> None:
    err = cli_one_line(
        capsys, ["train", "--out", str(run_copy), "--resume", *_args(train__epochs=1)]
    )
    assert "can only add epochs" in err


def test_resume_accepts_presentation_settings(capsys, run_copy) -> None:
    argv = ["train", "--out", str(run_copy), "--resume", *_args(train__epochs=2)]
    assert main([*argv, "train.progress=true", "train.tensorboard=true"]) == 0


def test_resume_refuses_more_epochs_of_a_cosine_schedule(tmp_path: Path) -> None:
    from mmbalance.train.rundir import check_run_dir, write_run_config

    cfg = resolve_config({**TINY, "train.scheduler": "cosine", "train.epochs": 4})
    write_run_config(cfg, tmp_path)
    check_run_dir(cfg, tmp_path, resume=True)  # the same configuration resumes
    longer = resolve_config({**TINY, "train.scheduler": "cosine", "train.epochs": 8})
    with pytest.raises(ConfigError, match="cosine"):
        check_run_dir(longer, tmp_path, resume=True)


def test_fresh_run_refuses_a_directory_holding_a_pretraining_stage(tmp_path: Path) -> None:
    from mmbalance.train.rundir import check_run_dir

    cfg = resolve_config(TINY)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(cfg, tmp_path, resume=False)


# --- item 5: compare reuses only identical runs --------------------------------------------------
def test_compare_refuses_runs_of_another_configuration(capsys, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    run_comparison(["joint"], TINY, out, seeds=1, report=False)
    for change, key in (("train.lr=0.5", "train.lr"), ("dataset.n_train=128", "dataset.n_train")):
        argv = ["compare", "--methods", "joint", "--seeds", "2", "--out", str(out)]
        err = cli_one_line(capsys, [*argv, *TINY_ARGS, change])
        assert f"differing keys: {key}" in err
    assert not (out / "joint" / "seed1").exists()  # refused before anything trained


def test_compare_reuses_a_run_that_differs_only_in_presentation(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    first = run_comparison(["joint"], TINY, out, seeds=1, report=False).records
    metrics = out / "joint" / "seed0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    again = run_comparison(
        ["joint"], {**TINY, "train.progress": True}, out, seeds=1, report=False
    ).records
    assert again == first and metrics.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("joint,joint", "lists 'joint' twice"),
        ("ogm_ge,ogm_ge[alpha=0.8]", "are the same configuration"),
    ],
)
def test_compare_refuses_one_configuration_twice(capsys, tmp_path, methods, message) -> None:
    argv = ["compare", "--methods", methods, "--seeds", "1", "--out", str(tmp_path / "c")]
    assert message in cli_one_line(capsys, [*argv, *TINY_ARGS])


# --- item 6: divergence is caught wherever it happens ---------------------------------------------
def test_divergence_in_the_last_step_of_an_epoch_is_caught(monkeypatch, tmp_path: Path) -> None:
    """Weights poisoned by the last step of epoch 1 (steps 3..5) are never evaluated, selected
    or saved; the message names the checkpoint that exists (epoch 0's)."""

    def poison_last_step(self, ctx) -> None:
        if ctx.step == 5:
            for params in ctx.encoder_params.values():
                for p in params:
                    p.grad.fill_(math.nan)

    monkeypatch.setattr(METHODS.get("joint"), "rewrite_gradients", poison_last_step)
    cfg = resolve_config({**TINY, "train.epochs": 3})
    with pytest.raises(TrainingDiverged, match="non-finite in epoch 1") as caught:
        fit(cfg, tmp_path)
    assert f"the last good checkpoint is {tmp_path / 'last.ckpt'} (end of epoch 0)" in str(
        caught.value
    )
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt["epoch"] == 0
        weights = ckpt.get("model") or ckpt["module"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_validation_loss_is_never_selected(capsys, tmp_path: Path) -> None:
    """The issue's case with one step per epoch (lr=1e30, as lr=inf is now refused)."""
    argv = ["train", "--out", str(tmp_path), *_args(dataset__n_train=32, train__lr=1e30)]
    err = cli_one_line(capsys, [*argv, "train.optimizer=sgd", "train.epochs=3"])
    assert "became" in err and "no checkpoint was saved" in err
    assert not (tmp_path / "best.ckpt").exists() and not (tmp_path / "last.ckpt").exists()


# --- item 7: DDP ------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Ids of the live spawned workers whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(pid) and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, waiting to be reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ddp_workers_die_with_their_parent(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmbalance.cli", "train", "--out", str(out)]
    cmd += _args(train__epochs=100000, train__devices=2, train__accelerator="cpu")
    env = dict(os.environ, MMBALANCE_CACHE=str(tmp_path / "cache"))
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 240
        while not (out / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.2)
        workers = _children(parent.pid)
        assert (out / "last.ckpt").exists() and len(workers) == 2, "the workers never trained"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers kept running after their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for w in workers:  # only the processes this test started
            if _alive(w):
                os.kill(w, signal.SIGKILL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["train.num_nodes=2", "train.accelerator=cpu"], "runs its processes on this one machine"),
        (["train.devices=3", "train.accelerator=cpu"], "divisible by the 3 processes"),
        (["train.precision=16-mixed", "train.accelerator=cpu"], "needs a CUDA GPU"),
        pytest.param(
            ["train.accelerator=cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_engine_settings_are_checked_before_any_process_starts(
    capsys, tmp_path, change, message
) -> None:
    started = time.perf_counter()
    err = cli_one_line(capsys, ["train", "--out", str(tmp_path / "r"), *TINY_ARGS, *change])
    assert message in err
    assert time.perf_counter() - started < 30  # no worker was spawned (nor waited for)
    assert not (tmp_path / "r" / "config.yaml").exists()


_RANK_RNG_SCRIPT = '''
"""Resume under DDP with ranks whose RNG streams differ: the resumed run must equal the
uninterrupted one. Everything runs in one set of spawned workers (spawning is slow)."""
import json
import sys
from pathlib import Path

import torch

from mmbalance.builder import resolve_config
from mmbalance.methods import METHODS
from mmbalance.builder import make_fabric
from mmbalance.methods.base import Method
from mmbalance.train import runner


@METHODS.register("rank_noise")
class RankNoise(Method):
    """Joint training on noisy latents; each rank draws extra numbers, so after the first
    step the ranks' RNG states differ."""

    name = "rank_noise"

    def transform_latents(self, latents, ctx):
        torch.rand(torch.distributed.get_rank() + 1)
        return {m: z + 0.5 * torch.randn_like(z) for m, z in latents.items()}


def worker(fabric, overrides, root):
    long = resolve_config({**overrides, "train.epochs": 4})
    short = resolve_config({**overrides, "train.epochs": 2})
    ref = runner._fit_in_process(fabric, long, root / "ref", False)
    runner._fit_in_process(fabric, short, root / "run", False)
    resumed = runner._fit_in_process(fabric, long, root / "run", True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return {
        "ref": [r["train_loss"] for r in ref.history],
        "resumed": [r["train_loss"] for r in resumed.history],
        "ref_metrics": ref.metrics,
        "resumed_metrics": resumed.metrics,
    }


if __name__ == "__main__":
    overrides = json.loads(sys.argv[1])
    root = Path(sys.argv[2])
    fabric = make_fabric(resolve_config(overrides))
    print("RESULT " + json.dumps(fabric.launch(worker, overrides, root)))
'''


def test_ddp_resume_restores_every_ranks_rng(tmp_path: Path) -> None:
    script = tmp_path / "rank_rng.py"
    script.write_text(textwrap.dedent(_RANK_RNG_SCRIPT))
    overrides = {**TINY, "method": "rank_noise", "train.devices": 2, "train.accelerator": "cpu"}
    env = dict(os.environ, MMBALANCE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(overrides), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["resumed"] == result["ref"]
    assert result["resumed_metrics"] == result["ref_metrics"]


def test_ddp_errors_reach_the_user_as_one_line(tmp_path: Path) -> None:
    """A divergence inside the spawned workers: one line and exit 2, no worker traceback."""
    cmd = [sys.executable, "-m", "mmbalance.cli", "train", "--out", str(tmp_path / "r")]
    cmd += _args(train__devices=2, train__accelerator="cpu", train__lr=1e30)
    env = dict(os.environ, MMBALANCE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [*cmd, "train.optimizer=sgd"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("mmbalance: error: ")
    assert "became" in done.stderr


# --- item 8: atomic outputs, damaged files, stale temporaries -----------------------------------
def test_every_output_is_renamed_into_place(monkeypatch, tmp_path: Path) -> None:
    renamed: list[str] = []
    original = os.replace

    def recording_replace(src: Any, dst: Any) -> None:
        renamed.append(Path(dst).name)
        original(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    run_comparison(["joint"], TINY, tmp_path / "cmp", seeds=1, report=False)
    expected = {"config.yaml", "metrics.json", "analysis.json", "metrics.csv"}
    assert expected | {"last.ckpt", "best.ckpt", "results.json"} <= set(renamed)
    leftovers = [p for p in (tmp_path / "cmp").rglob("*.tmp")]
    assert leftovers == []


def test_an_interrupted_write_keeps_the_old_file(monkeypatch, tmp_path: Path) -> None:
    from mmbalance.io import read_json, write_json_atomic, write_text_atomic

    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"old": 1})

    def killed(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"new": 2, "truncat')
    assert read_json(path) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b'{"metrics": {"val": ', "is damaged"), (b"\xff\xfe\x00binary", "is unreadable")],
)
def test_read_json_reports_a_damaged_file(tmp_path: Path, content: bytes, message: str) -> None:
    from mmbalance.io import read_json

    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_json(path)
    with pytest.raises(DataError, match="does not exist"):
        read_json(tmp_path / "missing.json")


def test_truncated_metrics_json_is_a_one_line_error_under_compare(capsys, tmp_path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "joint", "--seeds", "1", "--out", str(out), *TINY_ARGS]
    assert main(argv) == 0
    metrics = out / "joint" / "seed0" / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    err = cli_one_line(capsys, argv)
    assert "metrics.json' is damaged" in err


def test_stale_temporary_files_are_removed_when_a_run_resumes(capsys, run_copy) -> None:
    stale = [run_copy / ".last.ckpt.1a2b3c4d.tmp", run_copy / ".metrics.json.5e6f7a8b.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert main(["train", "--out", str(run_copy), "--resume", *_args(train__epochs=2)]) == 0
    assert not any(p.exists() for p in stale)


# --- item 9: input gaps ----------------------------------------------------------------------------
@pytest.fixture
def out_paths(tmp_path: Path) -> Iterator[dict[str, Path]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    yield {
        "a file": a_file,
        "under a file": a_file / "run",
        "not writable": Path("/proc/mmbalance-run"),
    }


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("a file", "is a file, not a directory"),
        ("under a file", "cannot be created"),
        ("not writable", "cannot be created"),
    ],
)
def test_unusable_out_is_a_one_line_error(capsys, out_paths, which, message) -> None:
    out = str(out_paths[which])
    assert message in cli_one_line(capsys, ["train", "--out", out, *TINY_ARGS])
    assert message in cli_one_line(
        capsys, ["compare", "--methods", "joint", "--out", out, *TINY_ARGS]
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"method: {name: multiloss, params: 5}\n", "method.params must be a mapping"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "is not a UTF-8 text file"),
        (b"\x00\x01\x02binary", "is not valid YAML"),
        (b"1: 2\n", "config keys must be names"),
    ],
)
def test_malformed_yaml_is_a_one_line_error(capsys, tmp_path, content, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert message in cli_one_line(capsys, ["train", str(path)])
    with pytest.raises(ConfigError):
        load_yaml(path)


# --- issue 19: comparison runs ---------------------------------------------------------------------
def test_compare_records_a_diverged_run_and_goes_on(capsys, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "multiloss[lam_uni=1e30],joint", "--seeds", "2"]
    argv += ["--out", str(out), *_args(train__lr=0.05), "train.optimizer=sgd"]
    err = cli_one_line(capsys, argv)
    assert "2 run(s) did not finish" in err and "multiloss[lam_uni=1e30] seed 0 diverged" in err
    records = _json(out / "results.json")
    failed = [r for r in records if r["split"] == "run" and r["metric"] == "status"]
    assert [(r["method"], r["seed"], r["value"]) for r in failed] == [
        ("multiloss[lam_uni=1e30]", 0, "diverged"),
        ("multiloss[lam_uni=1e30]", 1, "diverged"),
    ]
    assert all("became" in r["message"] for r in failed)
    finished = {(r["method"], r["seed"]) for r in records if r["metric"] == "accuracy"}
    assert finished == {("joint", 0), ("joint", 1)}
    assert _json(out / "multiloss[lam_uni=1e30]" / "seed0" / "diverged.json")["diverged"]
    # running again does not retrain the diverged runs; it reports them again
    config = out / "multiloss[lam_uni=1e30]" / "seed0" / "config.yaml"
    stamp = config.stat().st_mtime_ns
    assert "2 run(s) did not finish" in cli_one_line(capsys, argv)
    assert _json(out / "results.json") == records
    assert config.stat().st_mtime_ns == stamp


def test_compare_goes_on_after_a_diverged_run(monkeypatch, tmp_path: Path) -> None:
    """One method's runs diverge at their first step; the comparison still trains the other
    and records the diverged runs instead of stopping at the first."""

    def poison(self, ctx) -> None:
        for params in ctx.encoder_params.values():
            for p in params:
                p.grad.fill_(math.nan)

    monkeypatch.setattr(METHODS.get("multiloss"), "rewrite_gradients", poison)
    records = run_comparison(
        ["multiloss", "joint"], TINY, tmp_path / "cmp", seeds=2, report=False
    ).records
    status = [(r["method"], r["seed"], r["value"]) for r in records if r["split"] == "run"]
    assert status == [("multiloss", 0, "diverged"), ("multiloss", 1, "diverged")]
    finished = {(r["method"], r["seed"]) for r in records if r["metric"] == "accuracy"}
    assert finished == {("joint", 0), ("joint", 1)}
    assert _json(tmp_path / "cmp" / "results.json") == records


def test_compare_method_variants_and_scoped_options(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    methods = ["joint", "ogm_ge", "ogm_ge[alpha=1.2]"]
    records = run_comparison(
        methods, {**TINY, "method.alpha": 0.5}, out, seeds=1, report=False
    ).records
    assert {r["method"] for r in records} == {"joint", "ogm_ge", "ogm_ge[alpha=1.2]"}

    def method_section(label: str) -> dict[str, Any]:
        return yaml.safe_load((out / label / "seed0" / "config.yaml").read_text())["method"]

    assert method_section("joint") == {"name": "joint"}
    # every option is written out (defaults included); the scoped and bracketed ones as given
    plain, variant = method_section("ogm_ge"), method_section("ogm_ge[alpha=1.2]")
    assert plain["name"] == variant["name"] == "ogm_ge"
    assert plain["alpha"] == 0.5 and variant["alpha"] == 1.2
    assert {k: v for k, v in plain.items() if k != "alpha"} == {
        k: v for k, v in variant.items() if k != "alpha"
    }


def test_compare_method_option_of_no_compared_method_is_an_error(capsys, tmp_path) -> None:
    argv = ["compare", "--methods", "joint,ogm_ge", "--out", str(tmp_path / "c"), *TINY_ARGS]
    err = cli_one_line(capsys, [*argv, "method.lam=1"])
    assert "method.lam is an option of none of the compared methods (joint, ogm_ge)" in err


def test_method_variant_spelling() -> None:
    from mmbalance.compare import parse_method_spec, split_methods

    specs = split_methods("joint, ogm_ge[alpha=1.2],mcr[strategy=independent,lam=0.2],")
    assert specs == ["joint", "ogm_ge[alpha=1.2]", "mcr[strategy=independent,lam=0.2]"]
    assert parse_method_spec(specs[2]) == ("mcr", {"strategy": "independent", "lam": 0.2})
    assert parse_method_spec("joint") == ("joint", None)
    for bad in ("ogm_ge[alpha]", "ogm_ge[alpha=1", "x[a=../../etc]", "a b"):
        with pytest.raises(ConfigError):
            parse_method_spec(bad)
    with pytest.raises(ConfigError, match="names no method"):
        split_methods(" , ")


def test_named_method_sets_expand_in_order_without_repeats() -> None:
    from mmbalance.compare import METHOD_SETS, split_methods
    from mmbalance.methods import METHODS

    table1 = split_methods("table1")
    assert table1 == list(METHOD_SETS["table1"])
    # the MCR paper's Table 1: references, the eight published methods and MCR, all registered
    assert {"mslr", "mmcosine", "ogm_ge", "agm", "mlb", "reconboost", "mmpareto", "dr"} <= set(
        table1
    )
    assert all(m in METHODS for m in table1)
    assert split_methods("references,mcr,joint,ogm_ge[alpha=1.2]") == [
        "joint",
        "ensemble",
        "unimodal",
        "mcr",
        "ogm_ge[alpha=1.2]",
    ]
    every = split_methods("all")
    assert every[0] == "joint" and sorted(every) == sorted(METHODS.names())


def test_train_prints_the_best_epoch_that_metrics_json_records(capsys, tmp_path: Path) -> None:
    assert main(["train", "--out", str(tmp_path), *_args(train__epochs=3)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    best = _json(tmp_path / "metrics.json")["best_epoch"]
    assert f"best epoch {best} of 3 (counted from 0, as in metrics.json)" in printed
