"""Running a run: :func:`fit` (with DDP workers and unimodal pre-training) and
:func:`evaluate_run`.

``fit(cfg, out_dir)`` builds everything through :mod:`mmbalance.builder`, trains with a
:class:`~mmbalance.train.loop.Trainer` and returns its :class:`~mmbalance.train.loop.RunResult`;
see :mod:`mmbalance.train.loop` for the files a run directory holds.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from torch import Tensor
from torch.multiprocessing import ProcessExitedException

from mmbalance.builder.assemble import build_components, build_dataset
from mmbalance.builder.engine import check_engine, make_fabric
from mmbalance.builder.resolve import ResolvedConfig, resolve_config
from mmbalance.errors import DataError, MMBalanceError
from mmbalance.io import check_path_usable, is_written_file, make_dir, output_lock
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.plugins import load_specs, loaded_specs
from mmbalance.train.callbacks import default_callbacks
from mmbalance.train.checkpoint import BEST_KEYS, checkpoint_budget, load_checkpoint
from mmbalance.train.loop import Callback, RunResult, Trainer, encoder_state, load_state
from mmbalance.train.rundir import (
    check_resumable,
    check_run_dir,
    checkpoint_config,
    saved_overrides,
    write_data_record,
    write_run_config,
)


def fit(
    cfg: ResolvedConfig,
    out_dir: str | Path,
    resume: bool = False,
    callbacks: Sequence[Callback] | None = None,
) -> RunResult:
    """Train one run described by ``cfg`` into ``out_dir`` (``resume`` continues a killed run).

    Before anything starts, the engine settings are checked against this machine and
    ``out_dir`` against ``cfg`` (:func:`~mmbalance.train.rundir.check_run_dir`: a fresh run
    never reuses trained state, a resumed one keeps its saved configuration). ``callbacks``
    observe the run (default: :func:`~mmbalance.train.callbacks.default_callbacks` of ``cfg``;
    a unimodal pre-training stage always gets its own defaults).
    """
    out_dir = Path(out_dir)
    check_engine(cfg)
    check_run_dir(cfg, out_dir, resume)
    stage = out_dir / "pretrain"
    if resume and not is_written_file(out_dir / "last.ckpt"):
        # killed in its pre-training stage: that stage resumes what it was trained with
        if is_written_file(stage / "last.ckpt"):
            old = checkpoint_config(stage / "last.ckpt")
            check_resumable(old, pretraining_config(cfg).identity(), stage)
    with output_lock(out_dir):
        fabric = make_fabric(cfg)
        chosen = None if callbacks is None else list(callbacks)
        if fabric.world_size > 1 and isinstance(fabric.strategy, DDPStrategy):
            if fabric.strategy._start_method == "spawn":  # CPU / tests: spawn workers from here
                try:
                    result = fabric.launch(
                        _fit_in_worker,
                        cfg.identity(),
                        out_dir,
                        resume,
                        os.getpid(),
                        chosen,
                        loaded_specs(),
                    )
                except ProcessExitedException as err:
                    how = f"killed by {err.signal_name}" if err.signal_name else "exited"
                    if not err.signal_name:
                        how += f" with status {err.exit_code}"
                    raise MMBalanceError(
                        f"the training process of rank {err.error_index} (pid {err.error_pid}) was "
                        f"{how}; the other ranks were stopped; the run in {str(out_dir)!r} can "
                        "be resumed with --resume"
                    ) from None
                if isinstance(result, MMBalanceError):  # raised in the workers: one line here too
                    raise result
                return result
            fabric.launch()
        return _fit_in_process(fabric, cfg, out_dir, resume, chosen)


def _fit_in_worker(
    fabric: Fabric,
    options: Mapping[str, Any],
    out_dir: Path,
    resume: bool,
    parent: int,
    callbacks: list[Callback] | None,
    plugins: Sequence[tuple[str, str]] = (),
) -> RunResult | MMBalanceError:
    """A spawned DDP worker: train, then tear the process group down before the process exits
    (gloo's threads abort the process if it exits with the group still alive).

    The worker dies with its parent (a killed ``mmbalance`` must not leave orphans training
    on). A user-facing error is returned rather than raised, so that the parent re-raises it
    as one line instead of printing every worker's traceback; every rank raises the same
    error at the same point (the loss is all-reduced before it is checked), so none is left
    waiting in a collective. The worker first loads the plugins its parent was given
    (``plugins``: :func:`~mmbalance.plugins.loaded_specs`), so it sees the same components,
    and then resolves the configuration from ``options`` (its plain identity: a resolved
    configuration holds the plugins' own option classes, which the worker can unpickle only
    once the plugins are loaded).
    """
    _die_with_parent(parent)
    dist = torch.distributed
    outcome: RunResult | MMBalanceError
    try:
        load_specs(plugins)
        cfg = resolve_config(dict(options))
        outcome = _fit_in_process(fabric, cfg, out_dir, resume, callbacks)
    except MMBalanceError as err:
        # the traceback's frames hold the trainer and its DDP reducer: drop them, so that the
        # reducer is freed below while the process group is still alive (freed after the group,
        # gloo's threads abort the process, and the parent sees a crash instead of this error)
        err.__traceback__ = None
        err.__context__ = None
        outcome = err
    try:
        gc.collect()
        if dist.is_initialized():
            if isinstance(outcome, MMBalanceError):
                # every rank fails at the same step; do not wait forever for one that did not
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
    except RuntimeError:
        pass  # a rank that did not arrive: tear down anyway
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return outcome


def _die_with_parent(parent: int) -> None:
    """Make this process exit when process ``parent`` does.

    On Linux the kernel sends SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``; the
    "parent" is the thread that started the worker, the main thread that called :func:`fit`);
    elsewhere a daemon thread polls the parent id. A parent that died before this ran is caught
    by comparing ``getppid`` with the id it passed.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            pr_set_pdeathsig = 1
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="mmbalance-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _fit_in_process(
    fabric: Fabric,
    cfg: ResolvedConfig,
    out_dir: Path,
    resume: bool,
    callbacks: list[Callback] | None = None,
) -> RunResult:
    if fabric.is_global_zero:
        write_run_config(cfg, out_dir, resume)
    fabric.seed_everything(cfg.train.seed, verbose=False)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    data = build_dataset(cfg)
    if fabric.is_global_zero:
        write_data_record(data.record(), out_dir)
    method, model, method_module = build_components(cfg, data)
    pretrain_epochs = cfg.train.unimodal_pretrain_epochs
    initial: dict[str, Tensor] | None = None
    if method.needs_unimodal_pretraining or pretrain_epochs > 0:
        initial = encoder_state(model)  # the encoders as built, for on_train_start
        _unimodal_pretraining(fabric, cfg, out_dir / "pretrain", model, resume)
        if method.freezes_encoders:
            model.encoders.requires_grad_(False)
    observers = default_callbacks(cfg) if callbacks is None else callbacks
    trainer = Trainer(fabric, cfg, data, model, method, method_module, out_dir, initial, observers)
    return trainer.run(resume)


def pretraining_config(cfg: ResolvedConfig) -> ResolvedConfig:
    """The configuration of ``cfg``'s unimodal pre-training stage (``OUT/pretrain``)."""
    epochs = cfg.train.unimodal_pretrain_epochs or cfg.train.epochs
    return replace(
        cfg.with_method("ensemble"),
        unimodal_heads=True,
        train=replace(cfg.train, epochs=epochs, unimodal_pretrain_epochs=0),
    )


def _unimodal_pretraining(
    fabric: Fabric, cfg: ResolvedConfig, out_dir: Path, model: MultimodalModel, resume: bool
) -> None:
    """Train each encoder with its unimodal head alone (the ``ensemble`` method), then copy the
    validation-selected encoders and heads into ``model``."""
    pre_cfg = pretraining_config(cfg)
    if not (resume and is_written_file(out_dir / "metrics.json")):
        if fabric.is_global_zero:
            make_dir(out_dir)  # inside the run directory: a link planted there is replaced
        stage = default_callbacks(pre_cfg, prefix="unimodal pre-training")
        _fit_in_process(fabric, pre_cfg, out_dir, resume, stage)
    budget = checkpoint_budget(model)
    state = load_checkpoint(out_dir / "best.ckpt", BEST_KEYS, budget)["model"]
    keep = {k: v for k, v in state.items() if k.startswith(("encoders.", "unimodal_heads."))}
    if model.unimodal_heads:
        model.load_state_dict(keep, strict=False)
    else:
        model.load_state_dict({k: v for k, v in keep.items() if k.startswith("encoders.")}, False)


def beyond_accuracy_metrics(run_dir: str | Path) -> dict[str, float]:
    """The test metrics a run records beyond accuracy (balanced accuracy and calibration,
    :mod:`mmbalance.eval.metrics`; robustness, :mod:`mmbalance.eval.robustness`) of a finished
    run's selected weights (``best.ckpt``), for a run trained before runs recorded them; the
    run's ``config.yaml`` rebuilds data, model and method."""
    trainer = load_run(Path(run_dir) / "best.ckpt")
    test = trainer.evaluate("test")
    calibration = ("balanced_accuracy", "ece")
    out = {k: v for k, v in test.items() if k in calibration or k.startswith("unimodal_ece_")}
    return out | trainer.robustness()


def evaluate_run(path: str | Path) -> dict[str, dict[str, float]]:
    """Re-evaluate a finished or interrupted run on its validation and test splits.

    ``path`` is a run directory (its ``best.ckpt`` is used) or a checkpoint file inside one
    (``best.ckpt`` or ``last.ckpt``); the run's ``config.yaml`` rebuilds data, model and method.
    """
    path = Path(path)
    check_path_usable(path)
    trainer = load_run(path if path.is_file() else path / "best.ckpt")
    return {split: trainer.evaluate(split) for split in ("val", "test")}


def load_run(ckpt_path: str | Path) -> Trainer:
    """A trainer of the run that ``ckpt_path`` (a checkpoint inside a run directory) belongs
    to, built from its ``config.yaml`` on one process, with the checkpoint's weights (for
    re-evaluating and measuring a finished run)."""
    ckpt_path = Path(ckpt_path)
    run_dir = ckpt_path.parent
    if not is_written_file(run_dir / "config.yaml"):
        raise MMBalanceError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    saved = resolve_config(saved_overrides(run_dir) or {})
    cfg = saved.with_train(devices=1, num_nodes=1, progress=False, tensorboard=False)
    fabric = make_fabric(cfg)
    data = build_dataset(cfg)
    method, model, method_module = build_components(cfg, data)
    trainer = Trainer(fabric, cfg, data, model, method, method_module, run_dir, callbacks=[])
    ckpt = load_checkpoint(ckpt_path, max_bytes=checkpoint_budget(trainer.module))
    if "model" in ckpt:
        load_state(model, ckpt["model"], ckpt_path)
        if "method_module" in ckpt:
            trainer.restore_layout(ckpt, ckpt_path)
            load_state(trainer.method_module, ckpt["method_module"], ckpt_path)
    elif "module" in ckpt:
        trainer.restore_layout(ckpt, ckpt_path)
        load_state(trainer.module, ckpt["module"], ckpt_path)
    else:
        raise DataError(f"checkpoint {str(ckpt_path)!r} holds no model weights")
    return trainer
