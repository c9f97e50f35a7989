"""``--resume`` verifies what it resumes: the configuration the checkpoint was trained with (not a
``config.yaml`` that may have been edited), every field the checkpoint provides, and the
version of mmbalance that wrote it.

Behaviour tests drive the command line (in-process) and edit files, so that each of them also
runs, and fails, against the code before its fix.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_RUN_ARGS, cli_one_line

import mmbalance
from mmbalance.cli import main

RESUME = [*TINY_RUN_ARGS, "train.lr=0.02", "train.epochs=2"]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A joint run of one epoch at lr 0.02 (trained once per module; tests copy it)."""
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMBALANCE_CACHE", str(root / "cache"))
        argv = ["train", "--out", str(root / "run"), *TINY_RUN_ARGS, "train.lr=0.02"]
        assert main(argv) == 0
    return root / "run"


@pytest.fixture
def run(one_epoch_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(one_epoch_run, tmp_path / "run"))


def _resume(run: Path) -> list[str]:
    return ["train", "--out", str(run), "--resume", *RESUME]


def _edit_checkpoint(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def test_resume_compares_with_the_checkpoint_not_an_edited_config_yaml(capsys, run) -> None:
    """config.yaml edited from lr 0.02 to 0.5: the checkpoint says what was trained."""
    path = run / "config.yaml"
    edited = path.read_text().replace("lr: 0.02", "lr: 0.5")
    assert edited != path.read_text()
    path.write_text(edited)
    err = cli_one_line(capsys, ["train", "--out", str(run), "--resume", "train.epochs=2"])
    assert "differs from the configuration" in err and "train.lr" in err
    assert path.read_text() == edited  # nothing was written
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 0


def test_the_checkpoint_records_its_configuration_and_resumes(capsys, run) -> None:
    assert main(_resume(run)) == 0
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["version"] == mmbalance.__version__
    assert '"train.lr": 0.02' in ckpt["config"] and '"train.epochs": 2' in ckpt["config"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.02


def _numpy_keys(ckpt: dict[str, Any]) -> None:
    ckpt["rng"][0]["numpy_keys"] = torch.tensor([1, 2, 3])


DAMAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "epoch=-5": (lambda c: c.update(epoch=-5), "epoch -5 is not in 0..1"),
    "epoch beyond the run": (lambda c: c.update(epoch=7), "epoch 7 is not in 0..1"),
    "step=-1": (lambda c: c.update(step=-1), "step -1 is not a count of steps"),
    "best a mapping of text": (lambda c: c.update(best={"key": "ab"}), "is not a selection"),
    "best=5": (lambda c: c.update(best=5), "best 5 is not a selection state"),
    "best key text": (
        lambda c: c.update(best={"key": "ab", "epoch": 0}),
        "best key 'ab' is not two numbers",
    ),
    "best of a later epoch": (
        lambda c: c.update(best={"key": [0.5, -1.0], "epoch": 3}),
        "best epoch 3 is not in 0..0",
    ),
    "history=[1, 2]": (
        lambda c: c.update(history=[1, 2]),
        "the history is not one row for each of the 1 epochs",
    ),
    "step_logs=[1, 2]": (lambda c: c.update(step_logs=[1, 2]), "step log 0 is not a row"),
    "bad_epochs=-1": (lambda c: c.update(bad_epochs=-1), "bad_epochs -1 is not in 0..1"),
    "three numpy RNG keys": (_numpy_keys, "'numpy_keys' of rank 0 has 3 values, not 624"),
    "RNG of two processes": (
        lambda c: c.update(rng=c["rng"] * 2),
        "the RNG states of 2 processes, this run has 1",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_last_ckpt_is_refused_in_one_line(capsys, run, damage: str) -> None:
    edit, message = DAMAGES[damage]
    _edit_checkpoint(run / "last.ckpt", edit)
    before = (run / "metrics.csv").read_bytes()
    err = cli_one_line(capsys, _resume(run))
    assert "is damaged" in err and message in err
    assert (run / "metrics.csv").read_bytes() == before  # nothing trained


def test_a_run_of_another_version_resumes_with_a_notice(capsys, run) -> None:
    _edit_checkpoint(run / "last.ckpt", lambda c: c.update(version="0.0.1"))
    assert main(_resume(run)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1
    assert (
        f"written by mmbalance '0.0.1'; resuming it with mmbalance {mmbalance.__version__}"
        in (notes[0])
    )


def test_a_checkpoint_recording_another_configuration_is_refused(capsys, run) -> None:
    """The configuration inside last.ckpt edited (lr 0.5) while config.yaml says 0.02."""
    _edit_checkpoint(
        run / "last.ckpt",
        lambda c: c.update(config=c["config"].replace('"train.lr": 0.02', '"train.lr": 0.5')),
    )
    err = cli_one_line(capsys, _resume(run))
    assert "differs from the configuration" in err and "train.lr" in err
