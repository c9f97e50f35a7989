"""Callbacks observe training: the built-in files, progress and TensorBoard, a user's own
callback, and the provenance a run directory records."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mmbalance.builder import resolve_config
from mmbalance.train import Callback, default_callbacks, fit
from mmbalance.train.callbacks import (
    EpochCurves,
    MetricsFiles,
    Progress,
    TensorBoard,
    epoch_line,
    format_seconds,
)

FAST: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 240,
    "dataset.n_val": 120,
    "dataset.n_test": 200,
    "dataset.n_bayes": 1000,
    "method": "ogm_ge",
    "train.epochs": 3,
    "train.progress": False,
    "train.tensorboard": False,
}


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_run_start(self, trainer: Any) -> None:
        self.events.append(("start", trainer.start_epoch))

    def on_validation(self, trainer: Any, outputs: Any) -> dict[str, float]:
        share = float((outputs["prediction"].argmax(1) == 0).float().mean())
        return {"share_class0": share}

    def on_epoch_end(self, trainer: Any, row: Any) -> None:
        self.events.append(("epoch", dict(row)))

    def on_run_end(self, trainer: Any, result: Any) -> None:
        self.events.append(("end", result.best_epoch))


def test_a_users_callback_sees_every_point_and_adds_validation_metrics(tmp_path: Path) -> None:
    recorder = Recorder()
    result = fit(resolve_config(FAST), tmp_path, callbacks=[recorder])
    kinds = [k for k, _ in recorder.events]
    assert kinds == ["start", "epoch", "epoch", "epoch", "end"]
    rows = [v for k, v in recorder.events if k == "epoch"]
    assert rows == result.history
    assert all(0.0 <= r["val_share_class0"] <= 1.0 for r in rows)
    assert recorder.events[-1] == ("end", result.best_epoch)
    # without the default callbacks nothing but the run's own files is written
    assert not (tmp_path / "metrics.csv").exists()
    assert not any(k.startswith("val_shapley") for k in rows[0])


def test_default_callbacks_follow_the_configuration() -> None:
    kinds = {type(c) for c in default_callbacks(resolve_config(FAST))}
    assert kinds == {MetricsFiles, EpochCurves}
    on = resolve_config({**FAST, "train.progress": True, "train.tensorboard": True})
    assert {type(c) for c in default_callbacks(on)} == {
        MetricsFiles,
        EpochCurves,
        TensorBoard,
        Progress,
    }
    off = resolve_config({**FAST, "train.epoch_curves": False})
    assert {type(c) for c in default_callbacks(off)} == {MetricsFiles}


def test_progress_prints_one_persistent_line_per_epoch_for_logs(tmp_path: Path) -> None:
    stream = io.StringIO()  # not a terminal: plain lines only
    cfg = resolve_config(FAST)
    fit(cfg, tmp_path, callbacks=[MetricsFiles(), Progress("[2/5] ogm_ge seed 1", stream)])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"[2/5] ogm_ge seed 1  epoch {i + 1}/3  loss ")
        assert "val accuracy 0." in line
    assert "ETA" in lines[0] and "ETA" in lines[1]
    assert "ETA 0s" in lines[2]


def test_epoch_line_and_durations() -> None:
    row = {"epoch": 4, "train_loss": 0.5, "val_accuracy": 0.875, "seconds": 2.25}
    assert epoch_line(row, 10, "classification", 65) == (
        "epoch 5/10  loss 0.5000  val accuracy 0.8750  2.2s  ETA 1m05s"
    )
    assert "val mae" in epoch_line({"epoch": 0, "val_mae": 1.0}, 1, "regression", None)
    assert [format_seconds(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_tensorboard_gets_epoch_rows_and_the_methods_step_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = resolve_config({**FAST, "train.tensorboard": True})
    result = fit(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_accuracy"} <= tags
    step_tags = {t for t in tags if t.startswith("step/")}
    assert any("coef" in t for t in step_tags), step_tags  # OGM's modulation coefficients
    import csv

    tag = sorted(step_tags)[0]
    with open(tmp_path / "steps.csv") as f:
        logged = [r for r in csv.DictReader(f) if r["name"] == tag.removeprefix("step/")]
    scalars = events.Scalars(tag)
    assert [e.step for e in scalars] == [int(r["step"]) for r in logged]
    assert [e.value for e in scalars] == pytest.approx([float(r["value"]) for r in logged])
    assert len(events.Scalars("train_loss")) == result.epochs_run


def test_run_directory_records_provenance_and_every_default(tmp_path: Path) -> None:
    cfg = resolve_config({**FAST, "train.epochs": 1})
    fit(cfg, tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    # options left implicit are written out, so a later version trains the same run
    assert saved["method"]["alpha"] is not None and "ge" in saved["method"]
    assert "n_bayes" in saved["dataset"] and saved["dataset"]["n_train"] == 240
    info = json.loads((tmp_path / "provenance.json").read_text())["invocations"]
    assert len(info) == 1 and info[0]["resumed"] is False
    assert info[0]["torch"] == torch.__version__
    assert info[0]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert isinstance(info[0]["command"], list)
    fit(resolve_config({**FAST, "train.epochs": 2}), tmp_path, resume=True)
    info = json.loads((tmp_path / "provenance.json").read_text())["invocations"]
    assert [i["resumed"] for i in info] == [False, True]


def test_a_callback_cannot_be_skipped_by_the_pretraining_stage(tmp_path: Path) -> None:
    recorder = Recorder()
    cfg = resolve_config({**FAST, "method": "unipre_finetuned", "train.epochs": 2})
    fit(cfg, tmp_path, callbacks=[recorder])
    # the user's callbacks observe the main stage; the pre-training stage keeps its own files
    assert [k for k, _ in recorder.events].count("epoch") == 2
    assert (tmp_path / "pretrain" / "metrics.csv").is_file()


@pytest.mark.parametrize("flag", ["train.progress=true", "train.progress=false"])
def test_train_command_prints_epoch_lines_when_redirected(tmp_path: Path, flag: str) -> None:
    import subprocess

    args = [f"{k}={v}" for k, v in FAST.items() if k not in ("method", "train.progress")]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmbalance.cli",
            "train",
            "--method",
            "joint",
            *args,
            flag,
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == (3 if flag.endswith("true") else 0)
