"""The training loop: baselines learn, selection uses validation, resume is exact, DDP agrees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmbalance.builder import resolve_config
from mmbalance.errors import MMBalanceError, TrainingDiverged
from mmbalance.train import evaluate_run, fit
from mmbalance.train.callbacks import MetricsFiles
from mmbalance.train.checkpoint import load_checkpoint, save_atomic

CHANCE = 1 / 5


@pytest.mark.parametrize(
    "method",
    ["joint", "multiloss", "ensemble", "unimodal", "unipre_frozen", "unipre_finetuned"],
)
def test_baselines_learn(method: str, small: dict, tmp_path: Path) -> None:
    result = fit(resolve_config({**small, "method": method}), tmp_path)
    acc = result.metrics["test"]["accuracy"]
    assert acc > CHANCE + 0.4, f"{method} reached only {acc:.3f}"
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "metrics.csv").is_file()
    assert 0 <= result.best_epoch < small["train.epochs"]


def test_fused_methods_beat_the_weak_modality_alone(small: dict, tmp_path: Path) -> None:
    joint = fit(resolve_config({**small, "method": "joint"}), tmp_path / "j")
    weak = fit(
        resolve_config({**small, "method": "unimodal", "method.modality": "m2"}), tmp_path / "w"
    )
    assert joint.metrics["test"]["accuracy"] > weak.metrics["test"]["accuracy"] + 0.3


def test_selection_uses_validation_only(small: dict, tmp_path: Path) -> None:
    result = fit(resolve_config({**small, "method": "joint"}), tmp_path)
    val_acc = [row["val_accuracy"] for row in result.history]
    best = max(range(len(val_acc)), key=lambda e: (val_acc[e], -result.history[e]["val_loss"]))
    assert result.best_epoch == best
    assert "test_accuracy" not in result.history[0]
    # the final validation metrics are those of the selected epoch
    assert result.metrics["val"]["accuracy"] == pytest.approx(val_acc[best])


def test_early_stopping_counts_validation_epochs(small: dict, tmp_path: Path) -> None:
    cfg = resolve_config(
        {
            **small,
            "train.epochs": 40,
            "train.patience": 3,
            "train.optimizer": "adam",
            "train.lr": 0.01,
            "dataset.n_train": 200,
        }
    )
    result = fit(cfg, tmp_path)
    assert result.epochs_run < 40
    # it stopped exactly `patience` epochs after the selected one
    assert result.epochs_run == result.best_epoch + 1 + 3


def test_kill_and_resume_is_exact(small: dict, tmp_path: Path, monkeypatch) -> None:
    overrides = {**small, "method": "multiloss", "train.epochs": 5}
    reference = fit(resolve_config(overrides), tmp_path / "reference")

    original = MetricsFiles.on_epoch_end
    calls = {"n": 0}

    def crash_after_third_epoch(self, trainer, row):
        original(self, trainer, row)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed right after the epoch's checkpoint

    monkeypatch.setattr(MetricsFiles, "on_epoch_end", crash_after_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(resolve_config(overrides), tmp_path / "killed")
    monkeypatch.setattr(MetricsFiles, "on_epoch_end", original)
    assert load_checkpoint(tmp_path / "killed" / "last.ckpt")["epoch"] == 2
    resumed = fit(resolve_config(overrides), tmp_path / "killed", resume=True)
    assert resumed.metrics == reference.metrics
    assert resumed.best_epoch == reference.best_epoch
    assert [r["train_loss"] for r in resumed.history] == [
        r["train_loss"] for r in reference.history
    ]
    # the per-epoch curves of the epochs before the kill come back from the checkpoint
    curves = [k for k in reference.history[0] if k.startswith(("val_shapley_", "val_probe_acc_"))]
    assert curves and [[r[k] for k in curves] for r in resumed.history] == [
        [r[k] for k in curves] for r in reference.history
    ]


def test_compare_resumes_a_run_killed_in_its_pretraining_stage(
    small: dict, tmp_path: Path, monkeypatch
) -> None:
    """A kill during unimodal pre-training leaves ``pretrain/last.ckpt`` but nothing at the run's
    top level; re-running ``compare`` must resume that stage, not refuse the directory."""
    from mmbalance.compare import run_comparison

    overrides = {**small, "train.epochs": 3}
    reference = run_comparison(
        ["unipre_frozen"], overrides, tmp_path / "reference", seeds=1, report=False
    ).records
    original = MetricsFiles.on_epoch_end

    def crash_in_pretraining(self, trainer, row):
        original(self, trainer, row)
        if trainer.out_dir.name == "pretrain" and row["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsFiles, "on_epoch_end", crash_in_pretraining)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(["unipre_frozen"], overrides, tmp_path / "killed", seeds=1, report=False)
    monkeypatch.setattr(MetricsFiles, "on_epoch_end", original)
    run_dir = tmp_path / "killed" / "unipre_frozen" / "seed0"
    assert (run_dir / "pretrain" / "last.ckpt").is_file()
    assert not (run_dir / "last.ckpt").exists()
    resumed = run_comparison(
        ["unipre_frozen"], overrides, tmp_path / "killed", seeds=1, report=False
    ).records
    assert resumed == reference


def test_sigkill_and_resume_is_exact(small: dict, tmp_path: Path) -> None:
    """A real SIGKILL at an arbitrary moment, then --resume, gives the uninterrupted metrics."""
    args = [f"{k}={v}" for k, v in small.items() if k != "dataset"] + ["train.epochs=12"]
    cmd = [sys.executable, "-m", "mmbalance.cli", "train", "--dataset", "synthetic", *args]
    env = dict(os.environ)
    subprocess.run([*cmd, "--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "run")], env=env)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "run"), "--resume"], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert got == ref


def test_refuses_to_overwrite_a_run(small: dict, tmp_path: Path) -> None:
    cfg = resolve_config({**small, "train.epochs": 1})
    fit(cfg, tmp_path)
    with pytest.raises(MMBalanceError, match="already holds a run"):
        fit(cfg, tmp_path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small: dict, tmp_path: Path) -> None:
    cfg = resolve_config({**small, "train.epochs": 30, "train.lr": 1e6, "train.optimizer": "sgd"})
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch \d+, step \d+"):
        fit(cfg, tmp_path)
    if (tmp_path / "last.ckpt").exists():
        ckpt = load_checkpoint(tmp_path / "last.ckpt")
        assert all(
            torch.isfinite(v).all() for v in ckpt["module"].values() if v.is_floating_point()
        )


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    save_atomic({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"a": Unpicklable()}, path)
    assert load_checkpoint(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(MMBalanceError, match="is not a checkpoint archive"):
        load_checkpoint(path)


def test_evaluate_run_reproduces_final_metrics(small: dict, tmp_path: Path) -> None:
    result = fit(resolve_config({**small, "method": "ensemble"}), tmp_path)
    again = evaluate_run(tmp_path)
    for split in ("val", "test"):
        for k, v in again[split].items():
            assert v == pytest.approx(result.metrics[split][k], abs=1e-6)


def test_schedules_and_optimizers_run(small: dict, tmp_path: Path) -> None:
    for i, (opt, sched) in enumerate([("adamw", "cosine"), ("sgd", "step"), ("adam", "none")]):
        cfg = resolve_config(
            {
                **small,
                "train.epochs": 3,
                "train.optimizer": opt,
                "train.scheduler": sched,
                "train.step_size": 1,
                "train.warmup_epochs": 1,
            }
        )
        result = fit(cfg, tmp_path / str(i))
        lrs = [row["lr"] for row in result.history]
        assert lrs[0] < cfg.train.lr  # warm-up
        if sched == "step":
            assert lrs[2] == pytest.approx(cfg.train.lr * cfg.train.gamma)


def test_ddp_two_processes_match_one(small: dict, tmp_path: Path) -> None:
    base = {
        **small,
        "method": "joint",
        "train.epochs": 3,
        "train.batch_size": 32,
        "dataset.n_train": 512,
    }
    one = fit(resolve_config(base), tmp_path / "one")
    two = fit(
        resolve_config({**base, "train.devices": 2, "train.accelerator": "cpu"}), tmp_path / "two"
    )
    assert two.metrics["val"]["accuracy"] == pytest.approx(one.metrics["val"]["accuracy"], abs=2e-3)
    assert two.metrics["val"]["loss"] == pytest.approx(one.metrics["val"]["loss"], rel=1e-3)
    # train_loss is the mean over ranks (the global batch's loss), not rank 0's shard
    for a, b in zip(one.history, two.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3)
    # the per-epoch curves are computed from the gathered validation pass
    for key in ("val_shapley_m1", "val_shapley_m2", "val_probe_acc_m1"):
        assert two.history[-1][key] == pytest.approx(one.history[-1][key], abs=0.02)
    # evaluation saw every validation sample exactly once
    assert two.metrics["val"]["accuracy"] * small["dataset.n_val"] == pytest.approx(
        round(two.metrics["val"]["accuracy"] * small["dataset.n_val"]), abs=1e-6
    )


def test_regression_task_trains_and_reports_regression_metrics(small: dict, tmp_path: Path) -> None:
    overrides = {**small, "dataset.task": "regression", "method": "multiloss"}
    result = fit(resolve_config(overrides), tmp_path / "l1")
    test = result.metrics["test"]
    assert {"mae", "pearson", "binary_accuracy"} <= set(test)
    assert result.bayes_accuracy is None
    # targets are -2..2 (std ~1.4): a trained model must be far better than predicting 0
    assert test["mae"] < 0.9 and test["pearson"] > 0.7 and test["binary_accuracy"] > 0.8
    mse = fit(resolve_config({**overrides, "train.regression_loss": "mse"}), tmp_path / "mse")
    assert mse.metrics["test"]["pearson"] > 0.7


def test_mixed_precision_and_tensorboard(small: dict, tmp_path: Path) -> None:
    cfg = resolve_config(
        {**small, "train.precision": "bf16-mixed", "train.tensorboard": True, "train.epochs": 2}
    )
    result = fit(cfg, tmp_path)
    assert result.metrics["test"]["accuracy"] > CHANCE + 0.2
    assert any((tmp_path / "tb").iterdir())
