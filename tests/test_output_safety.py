"""What mmbalance writes: never through a planted link, never over a file it did not write,
never by two processes at once, never half a file on a full disk, and never markup from a
user's string in a report.

Behaviour tests drive the command line (in-process, through ``main``) and read files, so that
each of them also runs, and fails, against the code before its fix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import KS_CLIPS, KS_PREPARE_ARGS, TINY_RUN_ARGS, cli_one_line, write_ks_release

from mmbalance.cli import main

OWNER_MARK = ".mmbalance"  # the mark a command writes first into a directory it owns


def _ok(argv: list[str]) -> None:
    assert main(argv) == 0


def _written_files(root: Path) -> list[Path]:
    """Every file under ``root`` (relative), but the owner's mark."""
    return sorted(
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != OWNER_MARK
    )


def _plant_links(root: Path, victims: Path, names: list[Path]) -> dict[Path, bytes]:
    """Replace each file ``root / name`` by a link to a victim file of its own; returns the
    victims' contents. A directory that held files becomes a link to a victim directory."""
    victims.mkdir(exist_ok=True)
    planted: dict[Path, bytes] = {}
    for i, name in enumerate(names):
        target = root / name
        target.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        victim = victims / f"victim{i}"
        victim.write_bytes(f"the user's file {i}\n".encode())
        planted[victim] = victim.read_bytes()
        target.symlink_to(victim)
    return planted


def _assert_untouched(planted: dict[Path, bytes]) -> None:
    for victim, content in planted.items():
        assert victim.read_bytes() == content, f"{victim} was written through a link"


# --- item 1: no write follows a link, no temporary name can be planted -----------------------
def test_a_run_replaces_links_planted_at_every_path_it_writes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *TINY_RUN_ARGS, "train.tensorboard=true"]
    _ok(argv)
    files = [p for p in _written_files(out) if p.parts[0] != "tb"]
    assert {"config.yaml", "last.ckpt", "best.ckpt", "metrics.json", "metrics.csv"} <= {
        p.name for p in files
    }
    for p in (out / "tb").iterdir():
        p.unlink()
    (out / "tb").rmdir()
    planted = _plant_links(out, tmp_path / "victims", [*files, Path("tb")])
    secret_dir = tmp_path / "victim_dir"
    secret_dir.mkdir()
    (out / "tb").unlink()
    (out / "tb").symlink_to(secret_dir, target_is_directory=True)
    _ok(argv)  # a fresh run into its own directory, every path a planted link
    _assert_untouched(planted)
    assert list(secret_dir.iterdir()) == []
    for name in files:
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert not (out / "tb").is_symlink() and any((out / "tb").iterdir())


def test_a_comparison_and_its_report_replace_planted_links(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "joint", "--seeds", "1", "--out", str(out)]
    argv += TINY_RUN_ARGS[2:]  # --dataset synthetic is the default
    _ok(argv)
    files = _written_files(out)
    assert {"results.json", "report.md", "report_comparison.png"} <= {p.name for p in files}
    planted = _plant_links(out, tmp_path / "victims", files)
    _ok(argv)
    _assert_untouched(planted)
    for name in files:
        assert (out / name).is_file() and not (out / name).is_symlink()
    # the audit's case: a figure replaced by a link, then `mmbalance report`
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (out / "report_comparison.png").unlink()
    (out / "report_comparison.png").symlink_to(victim)
    _ok(["report", str(out)])
    assert victim.read_text() == "mine"
    assert (out / "report_comparison.png").read_bytes().startswith(b"\x89PNG")


def test_prepare_replaces_planted_links_and_has_no_predictable_temporary(tmp_path: Path) -> None:
    raw = write_ks_release(tmp_path / "raw", KS_CLIPS)
    out = tmp_path / "prepared"
    argv = ["prepare", "kinetics_sounds", "--raw", str(raw), "--out", str(out), *KS_PREPARE_ARGS]
    _ok(argv)
    files = _written_files(out)
    assert {"manifest.csv", "prepare_report.json", "classes.txt"} <= {p.name for p in files}
    # the temporary names of a writer that used its process id (tried for this one)
    pid = os.getpid()
    guessed = [Path(f".manifest.csv.{pid}.tmp")]
    guessed += [Path(sub) / f".a0.{pid}.tmp.npy" for sub in ("audio_stft", "audio_fbank", "frames")]
    planted = _plant_links(out, tmp_path / "victims", [*files, *guessed])
    _ok(argv)
    _assert_untouched(planted)
    for name in files:
        assert (out / name).is_file() and not (out / name).is_symlink()


# --- item 2: --out never overwrites a file mmbalance did not write ---------------------------
@pytest.mark.parametrize("command", ["train", "compare", "prepare"])
def test_out_holding_user_files_is_refused(capsys, tmp_path: Path, command: str) -> None:
    out = tmp_path / "p"
    out.mkdir()
    mine = {"config.yaml": "mine\n", "metrics.csv": "my,numbers\n", "analysis.json": "{}\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    if command == "prepare":
        raw = write_ks_release(tmp_path / "raw", KS_CLIPS)
        argv = ["prepare", "kinetics_sounds", "--raw", str(raw), "--out", str(out)]
        argv += KS_PREPARE_ARGS
    elif command == "compare":
        argv = ["compare", "--methods", "joint", "--seeds", "1", "--out", str(out)]
        argv += TINY_RUN_ARGS
    else:
        argv = ["train", "--out", str(out), *TINY_RUN_ARGS]
    err = cli_one_line(capsys, argv)
    assert "holds files mmbalance did not write" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == mine


@pytest.mark.parametrize("command", ["train", "compare", "prepare"])
def test_empty_out_is_refused(capsys, tmp_path: Path, monkeypatch, command: str) -> None:
    monkeypatch.chdir(tmp_path)
    argv = {
        "train": ["train", "--out", "", *TINY_RUN_ARGS],
        "compare": ["compare", "--methods", "joint", "--out", "", *TINY_RUN_ARGS],
        "prepare": ["prepare", "cremad", "--raw", str(tmp_path), "--out", ""],
    }[command]
    assert '--out "" names no directory' in cli_one_line(capsys, argv)
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_is_not_a_comparison(capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _ok(["train", "--out", str(out), *TINY_RUN_ARGS])
    argv = ["compare", "--methods", "joint", "--seeds", "1", "--out", str(out), *TINY_RUN_ARGS]
    assert "not a comparison directory" in cli_one_line(capsys, argv)


# --- item 6 (faults): one writer per output directory -----------------------------------------
def test_a_second_compare_on_one_out_is_refused(capsys, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "joint", "--seeds", "1", "--out", str(out)]
    slow = [*argv, *TINY_RUN_ARGS[2:], "train.epochs=100000"]
    env = dict(os.environ, MMBALANCE_CACHE=str(tmp_path / "cache"))
    first = subprocess.Popen(
        [sys.executable, "-m", "mmbalance.cli", *slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (out / "joint" / "seed0" / "last.ckpt").exists() and time.time() < deadline:
            assert first.poll() is None, "the first comparison stopped"
            time.sleep(0.1)
        # (one epoch: were it not refused, it could not train on for ever here)
        err = cli_one_line(capsys, [*argv, *TINY_RUN_ARGS[2:]])
        assert f"another mmbalance process is writing {str(out)!r}" in err
        assert first.poll() is None  # the first one goes on, its files untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(
    capsys, tmp_path: Path, monkeypatch
) -> None:
    """The device fills up while the second ``last.ckpt`` is written (torch's zip writer turns
    the error into a ``RuntimeError``)."""
    real_fdopen = os.fdopen
    saves = []

    class FullDisk:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if Path(name).name.startswith(".last.ckpt."):
            saves.append(name)
            if len(saves) == 2:
                return FullDisk(f)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    out = tmp_path / "run"
    err = cli_one_line(capsys, ["train", "--out", str(out), *TINY_RUN_ARGS, "train.epochs=3"])
    assert "no space left on the device" in err
    assert f"the last good checkpoint is {out / 'last.ckpt'} (end of epoch 0)" in err
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_a_killed_ddp_worker_is_one_line_naming_its_rank(capsys, tmp_path, monkeypatch) -> None:
    """What torch's process launcher raises when a worker dies of SIGKILL reaches the user as
    one line: which rank died, and that the run can be resumed."""
    from lightning.fabric import Fabric
    from torch.multiprocessing import ProcessExitedException

    def killed(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ProcessExitedException(
            "process 1 terminated with signal SIGKILL", 1, 4242, -9, "SIGKILL"
        )

    monkeypatch.setattr(Fabric, "launch", killed)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *TINY_RUN_ARGS, "train.devices=2"]
    err = cli_one_line(capsys, [*argv, "train.accelerator=cpu"])
    assert "rank 1 (pid 4242) was killed by SIGKILL" in err
    assert "can be resumed with --resume" in err


# --- item 7: no markup from a user's string in report.md --------------------------------------
HOSTILE = "multiloss<img src=x onerror=alert(1)>"


def test_labels_are_escaped_in_report_md(tmp_path: Path) -> None:
    """A comparison's results with hostile labels (as `compare` writes them, or as a file handed
    over holds them): report.md shows them as text, never as HTML, links or code."""
    out = tmp_path / "cmp"
    out.mkdir()
    labels = ["joint", HOSTILE, "x`<b>y [link](http://e)", "$x^$ | z"]
    records = [
        {"method": m, "seed": s, "split": split, "metric": metric, "value": 0.5 + 0.01 * (i + s)}
        for i, m in enumerate(labels)
        for s in (0, 1)
        for split in ("val", "test")
        for metric in ("accuracy", "macro_f1", "shapley_m1", "shapley_m2")
    ]
    (out / "results.json").write_text(json.dumps(records))
    _ok(["report", str(out)])
    md = (out / "report.md").read_text()
    for raw in (r"<img", r"<b>", r"\]\(http", r"\$x", r"\| z"):
        assert re.search(r"(?<!\\)" + raw, md) is None, raw  # each only escaped
    assert "multiloss\\<img src=x onerror=alert(1)>" in md
    # every row of the comparison table keeps its cells: no label adds a column
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    table = [line for line in lines[start : start + 2 + len(labels)] if line.startswith("|")]
    cells = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
    assert len(table) == 2 + len(labels) and len(cells) == 1, table
    html_page = (out / "report.html").read_text()
    assert "<img src=x" not in html_page and "<b>y" not in html_page
