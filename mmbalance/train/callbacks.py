"""Observers of training: every log file, logger, progress display and per-epoch analysis is a
:class:`~mmbalance.train.loop.Callback` (the interface lives beside the trainer that calls it).

The trainer calls each callback, on every process, at these points::

    on_run_start(trainer)                     once, after a resume has been restored
    on_train_batch_end(trainer, epoch, i, n, loss)   after each training step (progress)
    on_validation(trainer, outputs) -> dict   after each epoch's validation pass: extra
                                              validation metrics for the epoch's row (the
                                              per-modality curves); ``needs_latents`` asks the
                                              pass to keep the pooled latents in ``outputs``
    on_epoch_end(trainer, row)                after the epoch's row and checkpoints exist
    on_run_end(trainer, result)               after the final evaluation

Callbacks observe; they never change the model, the optimizer, the method or the data. The
built-in writers act on the global-zero process only; :class:`EpochCurves` computes its values on
every process (from the gathered validation pass) so that the processes stay identical.
``fit(cfg, out_dir, callbacks=[...])`` takes a user's own list (another logger, another
analysis...); :func:`default_callbacks` is what a run gets from its configuration.

Another logger (MLflow, Neptune, a database) is a callback like :class:`WandB`: start its run in
``on_run_start``, send ``row`` in ``on_epoch_end`` (and the per-step scalars of
``trainer.step_logs`` it has not sent yet), close it in ``on_run_end``; act on the global-zero
process only, and import the logger's package inside the callback so that the library does not
depend on it.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from mmbalance.builder.resolve import ResolvedConfig
from mmbalance.errors import ConfigError, shown
from mmbalance.eval.curves import epoch_curves
from mmbalance.io import make_dir, write_text_atomic
from mmbalance.train.loop import Callback, RunResult, Trainer


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as a CSV file (columns in first-seen order), written atomically."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def tidy_step_logs(step_logs: Sequence[Mapping[str, float]]) -> list[dict[str, Any]]:
    """Per-step method scalars as tidy rows ``{step, epoch, name, value}``."""
    return [
        {"step": r["step"], "epoch": r["epoch"], "name": k, "value": v}
        for r in step_logs
        for k, v in r.items()
        if k not in ("step", "epoch")
    ]


class MetricsFiles(Callback):
    """``metrics.csv`` (one row per epoch, the whole history, so a resumed run's file is whole)
    and ``steps.csv`` (the method's per-step scalars, tidy)."""

    def on_epoch_end(self, trainer: Trainer, row: Mapping[str, float]) -> None:
        if not trainer.fabric.is_global_zero:
            return
        write_csv(trainer.out_dir / "metrics.csv", trainer.history)
        tidy = tidy_step_logs(trainer.step_logs)
        if tidy:
            write_csv(trainer.out_dir / "steps.csv", tidy)


class EpochCurves(Callback):
    """The per-modality curves of :mod:`mmbalance.eval.curves` (unimodal-head and probe
    accuracy, Shapley values, imbalance degree) from each validation pass's latents."""

    needs_latents = True

    def on_validation(self, trainer: Trainer, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        model = trainer.model
        return epoch_curves(
            model.heads,
            {m: outputs[f"latent_{m}"] for m in model.modalities},
            outputs["targets"],
            trainer.method.predict,
            trainer.data.task,
            trainer.data.num_outputs,
            {m: outputs[f"unimodal_{m}"] for m in model.unimodal_heads},
        )


class TensorBoard(Callback):
    """TensorBoard events under ``tb/``: every number of each epoch's row (by epoch) and the
    method's per-step scalars under ``step/<name>`` (by global step).

    TensorBoard's writer is the one file mmbalance does not write itself: it appends to its
    event file as training goes. So that it cannot be led through a link, ``tb/`` is made a real
    directory inside the run directory (a link planted there is replaced,
    :func:`~mmbalance.io.make_dir`) and the event file's name ends in a random suffix, so no
    name can be planted in advance."""

    def __init__(self) -> None:
        self._writer: Any = None
        self._steps_written = 0

    def on_run_start(self, trainer: Trainer) -> None:
        # a resumed run writes the step scalars it has not written yet, not the old ones again
        self._steps_written = len(trainer.step_logs)

    def on_epoch_end(self, trainer: Trainer, row: Mapping[str, float]) -> None:
        if not trainer.fabric.is_global_zero:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = make_dir(trainer.out_dir / "tb")
            suffix = f".{secrets.token_hex(8)}"
            self._writer = SummaryWriter(str(log_dir), filename_suffix=suffix)
        epoch = int(row["epoch"])
        for k, v in row.items():
            if k != "epoch":
                self._writer.add_scalar(k, v, epoch)
        for r in trainer.step_logs[self._steps_written :]:
            for k, v in r.items():
                if k not in ("step", "epoch"):
                    self._writer.add_scalar(f"step/{k}", v, int(r["step"]))
        self._steps_written = len(trainer.step_logs)
        self._writer.flush()

    def on_run_end(self, trainer: Trainer, result: RunResult) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandB(Callback):
    """Weights & Biases: one W&B run per invocation, named after the run directory and grouped
    by the directory above it (a comparison's runs share a group), with the resolved
    configuration (every option, as in ``config.yaml``); every number of each epoch's row against ``epoch``, the method's per-step
    scalars as ``step/<name>`` against ``global_step``, and the final metrics
    (``<split>_<metric>``) in the run's summary.

    Needs the ``wandb`` extra (``pip install 'mmbalance[wandb]'``); W&B's own environment
    variables apply (``WANDB_MODE=offline`` logs to ``<run dir>/wandb`` without an account, for a
    later ``wandb sync``). ``init`` is passed on to ``wandb.init`` (``entity``, ``tags``...).
    """

    def __init__(self, project: str, **init: Any) -> None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.wandb needs Weights & Biases: pip install 'mmbalance[wandb]'")
        self.project = project
        self.init = init
        self._run: Any = None
        self._steps_written = 0
        self._defined: set[str] = set()

    def on_run_start(self, trainer: Trainer) -> None:
        self._steps_written = len(trainer.step_logs)
        if not trainer.fabric.is_global_zero:
            return
        import wandb

        out = trainer.out_dir.resolve()
        options = {"name": out.name, "group": out.parent.name, "dir": str(out)}
        if os.environ.get("WANDB_MODE"):  # read now: W&B keeps the settings of its first run
            options["mode"] = os.environ["WANDB_MODE"]
        options |= self.init
        config = trainer.cfg.to_dict()  # as config.yaml: every option
        try:
            self._run = wandb.init(project=self.project, config=config, **options)
        except wandb.errors.Error as err:  # no account, no network, a refused option
            raise ConfigError(
                f"W&B could not start ({shown(str(err), 200)}); log in with `wandb login`, or set "
                "WANDB_MODE=offline to log into the run directory without an account"
            ) from None
        self._run.define_metric("epoch")
        self._run.define_metric("global_step")

    def _define(self, key: str, step_metric: str) -> None:
        if key not in self._defined:
            self._run.define_metric(key, step_metric=step_metric)
            self._defined.add(key)

    def on_epoch_end(self, trainer: Trainer, row: Mapping[str, float]) -> None:
        if self._run is None:
            return
        for r in trainer.step_logs[self._steps_written :]:
            scalars = {f"step/{k}": v for k, v in r.items() if k not in ("step", "epoch")}
            for key in scalars:
                self._define(key, "global_step")
            self._run.log({"global_step": int(r["step"]), **scalars})
        self._steps_written = len(trainer.step_logs)
        for key in row:
            if key != "epoch":
                self._define(key, "epoch")
        self._run.log({**row, "epoch": int(row["epoch"])})

    def on_run_end(self, trainer: Trainer, result: RunResult) -> None:
        if self._run is None:
            return
        for split, values in result.metrics.items():
            self._run.summary.update({f"{split}_{k}": v for k, v in values.items()})
        self._run.summary["best_epoch"] = result.best_epoch
        self._run.finish()
        self._run = None


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def epoch_line(row: Mapping[str, float], epochs: int, task: str, eta: float | None) -> str:
    """One persistent progress line: epoch, train loss, validation score, epoch time, ETA."""
    metric = "accuracy" if task == "classification" else "mae"
    parts = [f"epoch {int(row['epoch']) + 1}/{epochs}"]
    if "train_loss" in row:
        parts.append(f"loss {row['train_loss']:.4f}")
    if f"val_{metric}" in row:
        parts.append(f"val {metric} {row[f'val_{metric}']:.4f}")
    parts.append(f"{row.get('seconds', 0.0):.1f}s")
    if eta is not None:
        parts.append(f"ETA {format_seconds(eta)}")
    return "  ".join(parts)


class Progress(Callback):
    """Progress on the terminal and in batch logs.

    Every epoch ends with one persistent line (train loss, validation score, epoch time, time
    left for the run). On a terminal a transient bar shows the epoch's steps as well; elsewhere
    (output redirected to a file) only the plain lines are printed, flushed as they come.
    ``prefix`` names the run in a comparison (``[3/24] mcr seed 1``). Epochs count from 1 here,
    as people read them ("epoch 1/30" is the first; files count from 0).
    """

    def __init__(self, prefix: str = "", stream: Any = None) -> None:
        self.prefix = prefix
        self.stream = stream
        self._bar: Any = None
        self._task: Any = None
        self._started = 0.0

    def _out(self) -> Any:
        return self.stream if self.stream is not None else sys.stdout

    def _tty(self) -> bool:
        out = self._out()
        return bool(getattr(out, "isatty", lambda: False)())

    def _print(self, text: str) -> None:
        out = self._out()
        print(f"{self.prefix}  {text}" if self.prefix else text, file=out, flush=True)

    def on_run_start(self, trainer: Trainer) -> None:
        self._started = time.perf_counter()
        if trainer.fabric.is_global_zero and trainer.start_epoch > 0:
            self._print(f"resuming after epoch {trainer.start_epoch}/{trainer.cfg.train.epochs}")

    def on_train_batch_end(
        self, trainer: Trainer, epoch: int, index: int, batches: int, loss: float
    ) -> None:
        if not (trainer.fabric.is_global_zero and self._tty()):
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = Console(file=self._out())
            self._bar = Progress(
                TextColumn(f"{self.prefix}  epoch {epoch + 1}/{trainer.cfg.train.epochs}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
                console=console,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=batches, info="")
        self._bar.update(self._task, completed=index + 1, info=f"loss {loss:.4f}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def on_epoch_end(self, trainer: Trainer, row: Mapping[str, float]) -> None:
        self._close_bar()
        if not trainer.fabric.is_global_zero:
            return
        epochs = trainer.cfg.train.epochs
        done = len(trainer.history)
        seconds = [r.get("seconds", 0.0) for r in trainer.history]
        recent = seconds[-5:]  # the last epochs predict the next ones best
        left = epochs - int(row["epoch"]) - 1
        eta = sum(recent) / len(recent) * left if recent and done else None
        self._print(epoch_line(row, epochs, trainer.data.task, eta))

    def on_run_end(self, trainer: Trainer, result: RunResult) -> None:
        self._close_bar()


def default_callbacks(cfg: ResolvedConfig, prefix: str = "") -> list[Callback]:
    """The callbacks a run's configuration asks for: the metrics files always, the per-epoch
    curves with ``train.epoch_curves``, TensorBoard with ``train.tensorboard``, Weights &
    Biases with ``train.wandb`` and progress with ``train.progress``."""
    callbacks: list[Callback] = [MetricsFiles()]
    if cfg.train.epoch_curves:
        callbacks.append(EpochCurves())
    if cfg.train.tensorboard:
        callbacks.append(TensorBoard())
    if cfg.train.wandb:
        callbacks.append(WandB(cfg.train.wandb))
    if cfg.train.progress:
        callbacks.append(Progress(prefix))
    return callbacks
