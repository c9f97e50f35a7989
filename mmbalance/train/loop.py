"""The training loop: one explicit loop for every method, on Lightning Fabric.

:class:`Trainer` runs the epochs of one run (built by :func:`mmbalance.train.runner.fit`); what it
writes besides checkpoints comes from its callbacks (:mod:`mmbalance.train.callbacks`). A run
directory holds::

    out_dir/config.yaml     the resolved configuration
    out_dir/last.ckpt       everything needed to resume (written atomically every epoch)
    out_dir/best.ckpt       the weights selected on the validation split (the model's and those
                            of the method's own module)
    out_dir/metrics.csv     one row per epoch (train loss terms, validation metrics, lr and,
                            with ``train.epoch_curves``, per-modality curves: see
                            :mod:`mmbalance.eval.curves`)
    out_dir/steps.csv       per-step scalars logged by the method (tidy: step, epoch, name, value)
    out_dir/tb/             TensorBoard events
    out_dir/metrics.json    final validation and test metrics of the selected model
    out_dir/analysis.json   Shapley contributions and error analysis of the selected model
    out_dir/provenance.json versions, command line and times of every invocation

Every file is written atomically (:mod:`mmbalance.io`), checkpoints load without running code
(:mod:`mmbalance.train.checkpoint`), and a directory never mixes two configurations
(:mod:`mmbalance.train.rundir`).

Model selection and early stopping look at the validation split only; the test split is
evaluated once, at the end, on the selected weights. A run whose loss, weights or validation
loss become non-finite stops with :class:`~mmbalance.errors.TrainingDiverged`; non-finite
weights are never selected or saved.

Epochs and steps are counted from 0 in every file (the ``epoch`` column of ``metrics.csv``,
``best_epoch`` in ``metrics.json``, the checkpoints, ``steps.csv``) and in every message that
names one; only the progress display counts epochs 1..N ("epoch 1/30" is the first).

The best checkpoint is selected right after each validation, before the method's
``on_epoch_end`` (which may change weights, as re-initialising methods do), so the selected
weights are always those that were scored.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn

import mmbalance
from mmbalance.builder.assemble import data_fingerprint
from mmbalance.builder.resolve import ResolvedConfig
from mmbalance.data.base import Batch, DatasetBundle, stratified_split
from mmbalance.errors import (
    ConfigError,
    DataError,
    MMBalanceError,
    NoSpaceLeft,
    TrainingDiverged,
    shown,
)
from mmbalance.eval.analysis import analyze_model
from mmbalance.eval.metrics import selection_key, task_metrics
from mmbalance.eval.robustness import RATES, robustness_metrics
from mmbalance.io import is_written_file, write_json_atomic
from mmbalance.methods.base import (
    TRAINING_SPLITS,
    EpochContext,
    EpochSubset,
    Method,
    Phase,
    SplitFeatures,
    task_loss,
)
from mmbalance.methods.protocol import TrainingProtocol
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.optim import OPTIMIZERS, build_optimizer, lr_factor
from mmbalance.train.batching import (
    EpochBatchSampler,
    ShardBatchSampler,
    SubsetBatchSampler,
    make_loader,
)
from mmbalance.train.checkpoint import (
    BEST_KEYS,
    LAST_KEYS,
    checkpoint_budget,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mmbalance.train.compiling import StepCompiler
from mmbalance.train.rundir import config_hash


@dataclass
class RunResult:
    """The outcome of one run: final metrics per split for the validation-selected model.

    ``config`` and ``data`` identify what was trained: the hash of the configuration
    (:func:`~mmbalance.train.rundir.config_hash`) and the fingerprint of the data
    (:func:`~mmbalance.builder.assemble.data_fingerprint`); ``metrics.json`` records both, so
    that a comparison reuses a finished run only for the same configuration and data."""

    out_dir: Path
    metrics: dict[str, dict[str, float]]
    best_epoch: int
    epochs_run: int
    bayes_accuracy: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    config: str = ""
    data: str = ""
    #: ``train.compile``'s outcome (:meth:`mmbalance.train.compiling.StepCompiler.summary`)
    compile: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "metrics": self.metrics,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "bayes_accuracy": self.bayes_accuracy,
            "config": self.config,
            "data": self.data,
        }
        if self.compile is not None:
            out["compile"] = self.compile
        return out


class Callback:
    """Base class: every hook does nothing (override the ones you need)."""

    #: the validation pass keeps the pooled latents (``latent_<m>``) for :meth:`on_validation`
    needs_latents: ClassVar[bool] = False

    def on_run_start(self, trainer: Trainer) -> None:
        """Once per invocation, before the first epoch it trains (after a resume is restored)."""

    def on_train_batch_end(
        self, trainer: Trainer, epoch: int, index: int, batches: int, loss: float
    ) -> None:
        """After training step ``index`` of ``batches`` in ``epoch`` (``loss``: its total)."""

    def on_validation(self, trainer: Trainer, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        """Extra validation metrics of this epoch from the gathered validation ``outputs``
        (``prediction``, ``logits``, ``targets``, ``index``, ``unimodal_<m>``, ``latent_<m>``);
        they join the row as ``val_<name>``."""
        return {}

    def on_epoch_end(self, trainer: Trainer, row: Mapping[str, float]) -> None:
        """After the epoch: ``row`` is its line of ``metrics.csv``; checkpoints are written."""

    def on_run_end(self, trainer: Trainer, result: RunResult) -> None:
        """After the selected weights were evaluated and ``metrics.json`` written."""


class Trainer:
    """Runs the epochs of one run; see the module docstring for what it writes.

    ``method_module`` is what ``method.setup`` returned (optimised and checkpointed with the
    model). ``initial_encoder_state`` is the encoders' state as built, before any unimodal
    pre-training (``on_train_start`` receives it; without it, the encoders as they are at the
    start). ``callbacks`` observe the run (:func:`~mmbalance.train.runner.fit` passes
    :func:`~mmbalance.train.callbacks.default_callbacks` of ``cfg``; none by default).
    """

    def __init__(
        self,
        fabric: Fabric,
        cfg: ResolvedConfig,
        data: DatasetBundle,
        model: MultimodalModel,
        method: Method,
        method_module: nn.Module | None,
        out_dir: Path,
        initial_encoder_state: Mapping[str, Tensor] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if method.grows_module and fabric.world_size > 1:
            raise ConfigError(
                f"method {method.name!r} adds parameters while it trains, which a model wrapped "
                "for several processes cannot take: run it with train.devices=1"
            )
        self.fabric, self.cfg, self.data = fabric, cfg, data
        self.data_fingerprint = data_fingerprint(cfg, data)  # recorded in what the run writes
        self.method, self.out_dir = method, out_dir
        self.model = model
        self.initial_encoder_state = initial_encoder_state
        t = cfg.train
        self.callbacks = list(callbacks)
        # the order of the method's hooks in a step, at epoch boundaries and in the feature pass
        # (mmbalance.methods.protocol), on this engine
        protocol = TrainingProtocol(
            method,
            model,
            method_module,
            task=data.task,
            regression_loss=t.regression_loss,
            seed=t.seed,
        )
        self.protocol = protocol
        self.method_module = protocol.method_module
        # named parameter groups (see mmbalance.methods.base); parameters frozen before the
        # trainer is built (frozen encoders) stay out of the optimizer
        self.groups = protocol.groups
        if not any(self.groups.values()):
            raise MMBalanceError("the model has no trainable parameters")
        optimizer = build_optimizer(protocol.param_groups(keep_empty=True), t)
        self.module, self.optimizer = fabric.setup(protocol.module, optimizer)
        protocol.forward = self.module
        protocol.backward = fabric.backward
        protocol.all_reduce = lambda x: fabric.all_reduce(x, reduce_op="sum")
        protocol.world_size = fabric.world_size
        protocol.gather = lambda local: gather_in_order(fabric.all_gather, fabric.world_size, local)
        if t.precision != "32-true":
            protocol.autocast = fabric.autocast
        rank, world = fabric.global_rank, fabric.world_size
        train_index, held_out_index = _hold_out(data.splits["train"], method, t.seed)
        self.split_index = {"train": train_index, "held_out": held_out_index}
        self.train_sampler = EpochBatchSampler(
            len(train_index), t.batch_size, t.seed, rank, world, indices=train_index
        )
        self.loaders = {
            "train": make_loader(data.splits["train"], self.train_sampler, t.num_workers),
        }
        for split in ("val", "test"):
            sampler = ShardBatchSampler(len(data.splits[split]), 2 * t.batch_size, rank, world)
            self.loaders[split] = make_loader(data.splits[split], sampler, t.num_workers)
        self.encoder_params = protocol.encoder_params
        # train.compile: the step's forward compiled (mmbalance.train.compiling)
        self.compiler: StepCompiler | None = None
        if t.compile is not False:
            steps = t.epochs * len(self.loaders["train"])
            self.compiler = StepCompiler(protocol, t.compile, steps, log=self._log)
        self.history: list[dict[str, float]] = []
        self.step_logs: list[dict[str, float]] = []
        self.best: dict[str, Any] | None = None
        self.bad_epochs = 0
        self.start_epoch = 0
        self.saved_epoch: int | None = None  # the epoch last.ckpt holds (None: none saved)

    @property
    def step(self) -> int:
        """The global step count (one per batch)."""
        return self.protocol.step

    @step.setter
    def step(self, value: int) -> None:
        self.protocol.step = value

    @property
    def phase(self) -> Phase | None:
        """The method's phase of the last epoch begun."""
        return self.protocol.phase

    # --- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool) -> RunResult:
        t = self.cfg.train
        last = self.out_dir / "last.ckpt"
        if resume and is_written_file(last):
            budget = checkpoint_budget(self.module, self.method_module)
            self._restore(load_checkpoint(last, LAST_KEYS, budget), last)
        elif is_written_file(last) and not resume:
            raise MMBalanceError(
                f"{str(self.out_dir)!r} already holds a run; resume it or choose another --out"
            )
        if self.start_epoch == 0:
            self._notice_gradient_scaling()
            start_ctx = self.epoch_context(0)
            start_ctx.initial_encoder_state = self.initial_encoder_state or encoder_state(
                self.model
            )
            self.method.on_train_start(start_ctx)
        self.initial_encoder_state = None  # read once: do not hold a copy of the encoders
        for callback in self.callbacks:
            callback.on_run_start(self)
        stopped = t.patience is not None and self.bad_epochs >= t.patience
        for epoch in range(self.start_epoch, t.epochs):
            if stopped:
                break
            started = time.perf_counter()
            start_ctx = self.epoch_context(epoch)
            lr = t.lr * lr_factor(t, epoch)
            begun = self.protocol.begin_epoch(
                start_ctx, self.optimizer, lambda _, lr=lr: lr, self.split_index["train"]
            )
            train_stats = self._train_epoch(epoch, begun.subsets)
            # the loss is checked at every step, but the weights after an epoch's last step only
            # here: never evaluate, select or save non-finite weights
            if not self._weights_finite():
                raise self._diverged(f"the weights became non-finite in epoch {epoch}")
            val = self.validate()
            if not math.isfinite(val["loss"]):
                raise self._diverged(f"the validation loss became {val['loss']} at epoch {epoch}")
            # select on the weights just scored, before on_epoch_end may change them
            key = selection_key(val, self.data.task)
            if self.best is None or key > tuple(self.best["key"]):
                self.best = {"key": list(key), "epoch": epoch}
                self.bad_epochs = 0
                best = {
                    "model": self.model.state_dict(),
                    "method_module": self.method_module.state_dict(),
                    "method_layout": self.method.module_layout(),
                    "epoch": epoch,
                    "data": self.data_fingerprint,
                }
                self._save("best.ckpt", best)
            else:
                self.bad_epochs += 1
            end_ctx = self.epoch_context(epoch, val)
            row = {"epoch": epoch, "lr": lr}
            row |= {f"lr_scale_{k}": v for k, v in begun.scales.items()}
            row |= train_stats | self.protocol.end_epoch(start_ctx, end_ctx, self.optimizer)
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            stopped = t.patience is not None and self.bad_epochs >= t.patience
            self._save("last.ckpt", self._snapshot(epoch))
            self.saved_epoch = epoch
            for callback in self.callbacks:
                callback.on_epoch_end(self, row)
        return self._finish()

    def _train_epoch(
        self, epoch: int, subsets: Sequence[EpochSubset] | None = None
    ) -> dict[str, float]:
        """One epoch of steps: over the whole training split, or over the method's subsets (see
        :meth:`~mmbalance.methods.base.Method.epoch_subsets`) in turn."""
        fabric = self.fabric
        self.train_mode()
        names: list[str | None]
        if subsets is None:
            self.train_sampler.set_epoch(epoch)
            loader = self.loaders["train"]
            names = [None] * len(loader)
        else:
            t = self.cfg.train
            sampler = SubsetBatchSampler(
                [(s.name, s.index) for s in subsets],
                t.batch_size,
                t.seed,
                epoch,
                fabric.global_rank,
                fabric.world_size,
            )
            loader = make_loader(self.data.splits["train"], sampler, t.num_workers)
            names = list(sampler.names)
        sums: dict[str, float] = {}
        count = 0
        batches = len(names)
        for batch in loader:
            terms = self.train_step(batch.to(fabric.device), epoch, count / batches, names[count])
            value = sum(terms.values())
            sums["train_loss"] = sums.get("train_loss", 0.0) + value
            for name, term_value in terms.items():
                sums[f"train_{name}"] = sums.get(f"train_{name}", 0.0) + term_value
            for callback in self.callbacks:
                callback.on_train_batch_end(self, epoch, count, batches, value)
            count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}

    def train_mode(self) -> None:
        """Training mode for the step, with frozen encoders kept in eval mode."""
        self.module.train()
        if self.method.freezes_encoders:
            self.model.encoders.eval()

    def train_step(
        self, batch: Batch, epoch: int, progress: float = 0.0, subset: str | None = None
    ) -> dict[str, float]:
        """One optimisation step on ``batch`` (already on the device): the method's forward
        transformation and losses, its backward and gradient rewrite, clipping, the optimizer
        step. ``progress`` is the fraction of the epoch's batches before this one, ``subset``
        the epoch subset the batch comes from (``None`` in the usual epoch). Returns the loss
        terms as floats. The cost benchmark times exactly this call.
        """
        ctx = self.protocol.context(
            batch.targets,
            batch.inputs,
            epoch,
            index=batch.index,
            epoch_progress=progress,
            subset=subset,
        )
        compiler = self.compiler
        if compiler is None:
            terms = self.protocol.run_step(ctx, self.optimizer, self._before_optimizer_step)
        else:
            compiler.before_step()
            started = time.perf_counter()
            terms = self.protocol.run_step(ctx, self.optimizer, self._before_optimizer_step)
            compiler.after_step(time.perf_counter() - started)
        if ctx.logs:
            logged = {k: float(v) for k, v in ctx.logs.items()}
            self.step_logs.append({"step": ctx.step, "epoch": epoch, **logged})
        return terms

    def _before_optimizer_step(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """Clip the gradients, then read the loss terms once (one synchronisation per step), as
        their mean over ranks under DDP (the global batch's loss, and the same value, so the same
        decision, on every rank). A non-finite loss stops the run before anything of this step is
        saved, so the last checkpoint on disk stays the last good one."""
        if self.cfg.train.grad_clip is not None:
            self.fabric.clip_gradients(
                self.module, self.optimizer, max_norm=self.cfg.train.grad_clip
            )
        stacked = torch.stack([term.detach().reshape(()).float() for term in losses.values()])
        if self.fabric.world_size > 1:
            stacked = self.fabric.all_reduce(stacked, reduce_op="mean")
        terms = dict(zip(losses, stacked.tolist(), strict=True))
        value = sum(terms.values())
        if not math.isfinite(value):
            raise self._diverged(
                f"loss became {value} at epoch {self.protocol.epoch}, step {self.step}"
            )
        return terms

    def _weights_finite(self) -> bool:
        """Whether every floating-point parameter and buffer is finite (one synchronisation)."""
        tensors = itertools.chain(self.module.parameters(), self.module.buffers())
        flags = [t.detach().isfinite().all() for t in tensors if t.is_floating_point()]
        return not flags or bool(torch.stack(flags).all())

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error for a divergence, naming only a checkpoint that exists (the epoch counts
        from 0, as in ``metrics.csv``)."""
        last = self.out_dir / "last.ckpt"
        if self.saved_epoch is not None and last.is_file():
            kept = f"the last good checkpoint is {last} (end of epoch {self.saved_epoch})"
        else:
            kept = "no checkpoint was saved before it"
        return TrainingDiverged(f"{what} (epochs and steps count from 0); {kept}")

    # --- passes over a split ---------------------------------------------------------------------
    def split_outputs(self, split: str, latents: bool = False) -> dict[str, Tensor]:
        """Outputs of the current weights on ``split`` (``val`` or ``test``), each sample once,
        in dataset order.

        Returns ``prediction`` (what the method predicts), ``logits`` (the fused head's),
        ``targets``, ``index``, when the model has unimodal heads ``unimodal_<m>`` and, with
        ``latents``, the pooled latents ``latent_<m>`` (gathered like the rest, so every rank
        holds all of them).
        """
        device = self.fabric.device
        return self.protocol.outputs((b.to(device) for b in self.loaders[split]), latents)

    def features(self, split: str, fraction: float = 1.0) -> SplitFeatures:
        """A no-grad, eval-mode pass over ``split`` for the method's epoch hooks (see
        :class:`~mmbalance.methods.base.EpochContext`); never the test split."""
        dataset, index = self._training_split(split)

        def load(chosen: Tensor) -> Any:
            sampler = ShardBatchSampler(
                len(chosen),
                2 * self.cfg.train.batch_size,
                self.fabric.global_rank,
                self.fabric.world_size,
                indices=chosen,
            )
            return (batch.to(self.fabric.device) for batch in make_loader(dataset, sampler, 0))

        return self.protocol.features(index, load, fraction)

    def _training_split(self, split: str) -> tuple[Any, Tensor]:
        """The dataset and the indices of a split a method may read (never test)."""
        if split not in TRAINING_SPLITS:
            raise ValueError(f"a method may read the splits {TRAINING_SPLITS}, not {split!r}")
        dataset = self.data.splits["val" if split == "val" else "train"]
        index = self.split_index.get(split)
        if index is None:
            index = torch.arange(len(dataset))
        return dataset, index

    def split_batches(self, split: str) -> Iterator[Batch]:
        """The batches of ``split`` with raw inputs for the method's epoch hooks (see
        :class:`~mmbalance.methods.base.EpochContext`): on the device, each sample once in dataset
        order, the whole split on every rank; never the test split."""
        dataset, index = self._training_split(split)
        sampler = ShardBatchSampler(len(index), 2 * self.cfg.train.batch_size, indices=index)
        for batch in make_loader(dataset, sampler, 0):
            yield batch.to(self.fabric.device)

    def epoch_context(
        self, epoch: int, val_metrics: Mapping[str, float] | None = None
    ) -> EpochContext:
        """The context of the epoch-level method hooks for ``epoch``."""
        return self.protocol.epoch_context(
            epoch, self.features, self.split_batches, val_metrics, self.history
        )

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current weights on ``split`` (``val`` or ``test``)."""
        return self._metrics(self.split_outputs(split))

    def validate(self) -> dict[str, float]:
        """This epoch's validation metrics, with what the callbacks add from the same pass
        (every rank computes them on the gathered outputs, so ranks stay identical)."""
        latents = any(c.needs_latents for c in self.callbacks)
        outputs = self.split_outputs("val", latents=latents)
        metrics = self._metrics(outputs)
        for callback in self.callbacks:
            metrics |= callback.on_validation(self, outputs)
        return metrics

    def _metrics(self, out: Mapping[str, Tensor]) -> dict[str, float]:
        task, n_out = self.data.task, self.data.num_outputs
        metrics = task_metrics(out["prediction"], out["targets"], task, n_out)
        metrics["loss"] = float(
            task_loss(out["prediction"], out["targets"], task, self.cfg.train.regression_loss)
        )
        for m in self.model.unimodal_heads:
            uni = task_metrics(out[f"unimodal_{m}"], out["targets"], task, n_out)
            primary = "accuracy" if task == "classification" else "mae"
            metrics[f"unimodal_{primary}_{m}"] = uni[primary]
            if "ece" in uni:
                metrics[f"unimodal_ece_{m}"] = uni["ece"]
        return metrics

    def robustness(self, rates: Sequence[float] = RATES) -> dict[str, float]:
        """The robustness metrics of the current weights on the test split
        (:mod:`mmbalance.eval.robustness`, at ``rates``), in eval mode (restored afterwards)."""
        was_training = self.module.training
        self.module.eval()
        try:
            return robustness_metrics(
                self.model.heads,
                self.data.splits["test"],
                self.method.predict_missing,
                lambda inputs: self.method.encode_eval(self.model, inputs),
                self.model.modalities,
                task=self.data.task,
                rates=rates,
                device=self.fabric.device,
                batch_size=2 * self.cfg.train.batch_size,
            )
        finally:
            if was_training:
                self.train_mode()

    def _log(self, line: str) -> None:
        if self.fabric.is_global_zero:
            print(f"mmbalance: {line}", file=sys.stderr)

    def _finish(self) -> RunResult:
        if self.compiler is not None:
            self.compiler.finish()
        best_epoch = -1
        if self.best is not None:
            best = self.out_dir / "best.ckpt"
            budget = checkpoint_budget(self.model, self.method_module)
            state = load_checkpoint(best, BEST_KEYS, budget)
            load_state(self.model, state["model"], best)
            if "method_module" in state:  # methods whose own module shapes the prediction
                self.restore_layout(state, best)
                load_state(self.method_module, state["method_module"], best)
            best_epoch = state["epoch"]
            if _integer(best_epoch) is None or not 0 <= best_epoch < max(1, len(self.history)):
                raise DataError(f"checkpoint {str(best)!r} holds epoch {shown(best_epoch)}")
        metrics = {split: self.evaluate(split) for split in ("val", "test")}
        if self.fabric.is_global_zero:
            splits = self.data.splits
            self.module.eval()  # the method's module too: it may encode (encode_eval)
            analysis, scalars = analyze_model(
                self.model,
                splits["train"],
                splits["test"],
                self.method.predict,
                task=self.data.task,
                encode=lambda inputs: self.method.encode_eval(self.model, inputs),
            )
            metrics["test"] |= scalars
            metrics["test"] |= self.robustness()
            write_json_atomic(self.out_dir / "analysis.json", analysis)
        result = RunResult(
            self.out_dir,
            metrics,
            best_epoch,
            len(self.history),
            self.data.bayes_accuracy,
            self.history,
            config_hash(self.cfg),
            self.data_fingerprint,
            None if self.compiler is None else self.compiler.summary(),
        )
        if self.fabric.is_global_zero:
            write_json_atomic(self.out_dir / "metrics.json", result.to_json())
        for callback in self.callbacks:
            callback.on_run_end(self, result)
        return result

    # --- state ---------------------------------------------------------------------------------
    def _snapshot(self, epoch: int) -> dict[str, Any]:
        """Everything a resume needs; called on every rank (it gathers each rank's RNG state,
        stored as a list indexed by global rank)."""
        local = rng_state()
        world = self.fabric.world_size
        if world > 1:
            gathered = self.fabric.all_gather(local)
            # clones: a row of the gathered tensor is a view into all ranks' storage
            rngs = [{k: v[r].cpu().clone() for k, v in gathered.items()} for r in range(world)]
        else:
            rngs = [local]
        return {
            "epoch": epoch,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "rng": rngs,
            "step": self.step,
            "history": self.history,
            "step_logs": self.step_logs,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "phase": None if self.phase is None else self.phase.name,
            "method_layout": self.method.module_layout(),
            # what was trained: the configuration (checked on resume) and the data
            "config": json.dumps(self.cfg.identity(), sort_keys=True),
            "data": self.data_fingerprint,
            "version": mmbalance.__version__,
            "compile": None if self.compiler is None else self.compiler.state_dict(),
        }

    def _restore(self, ckpt: Mapping[str, Any], path: Path) -> None:
        """Continue from ``last.ckpt``, after checking every field it provides: the data it was
        trained on, its epoch, step, history, step logs, selection state and the RNG states of
        every process (one line naming the field if one is out of range or malformed)."""
        world = self.fabric.world_size
        if ckpt.get("data") != self.data_fingerprint:
            raise DataError(
                f"checkpoint {str(path)!r} was trained on other data than dataset "
                f"{self.data.name!r} holds now (its files changed since); it cannot be resumed"
            )
        self.restore_layout(ckpt, path)
        fields = check_resume_fields(ckpt, self.cfg.train.epochs, world)
        if fields is not None:
            raise DataError(f"checkpoint {str(path)!r} is damaged: {fields}; not resumed")
        rngs = ckpt["rng"]
        load_state(self.module, ckpt["module"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.method.load_state_dict(ckpt["method"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
            raise DataError(
                f"checkpoint {str(path)!r} does not match this run ({type(err).__name__})"
            ) from None
        self.step = ckpt["step"]
        self.history = [dict(row) for row in ckpt["history"]]
        self.step_logs = [dict(row) for row in ckpt["step_logs"]]
        best = ckpt["best"]
        self.best = None if best is None else {"key": list(best["key"]), "epoch": best["epoch"]}
        self.bad_epochs = ckpt["bad_epochs"]
        self.start_epoch = ckpt["epoch"] + 1
        phase_name = ckpt.get("phase")
        if self.compiler is not None:  # train.compile=auto keeps the decision it took
            self.compiler.load_state_dict(ckpt.get("compile"))
        set_rng_state(rngs[self.fabric.global_rank])
        self.saved_epoch = self.start_epoch - 1
        self.protocol.resume_phase(phase_name, self.start_epoch - 1)

    def restore_layout(self, ckpt: Mapping[str, Any], path: Path) -> None:
        """Rebuild the method's module to the layout a checkpoint's weights have (methods that
        grow it), and give any new parameters to the optimizer."""
        layout = ckpt.get("method_layout") or {}
        if not isinstance(layout, Mapping):
            raise DataError(f"checkpoint {str(path)!r} does not match this run (method_layout)")
        try:
            self.protocol.restore_module_layout(layout, self.optimizer)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"checkpoint {str(path)!r} does not match this run ({type(err).__name__})"
            ) from None

    def _save(self, name: str, obj: Any) -> None:
        if self.fabric.is_global_zero:
            try:
                save_checkpoint(obj, self.out_dir / name)
            except NoSpaceLeft as err:
                last = self.out_dir / "last.ckpt"
                if self.saved_epoch is not None and last.is_file():
                    kept = f"the last good checkpoint is {last} (end of epoch {self.saved_epoch})"
                else:
                    kept = "no checkpoint was saved before it"
                raise NoSpaceLeft(
                    f"{str(err).partition(';')[0]} (epoch {obj['epoch']}, counted from 0); "
                    f"{kept}; free some space and resume with --resume"
                ) from None
        self.fabric.barrier()

    def _notice_gradient_scaling(self) -> None:
        """Say at run start when a gradient-scaling method runs under an adaptive optimizer."""
        if (
            self.method.scales_gradients
            and OPTIMIZERS.get(self.cfg.train.optimizer).adaptive
            and self.fabric.is_global_zero
        ):
            print(
                f"mmbalance: note: {self.method.name} scales whole gradients or learning rates, "
                f"which {self.cfg.train.optimizer} largely undoes by its normalisation; to see "
                "its effect, also run it with train.optimizer=sgd",
                file=sys.stderr,
            )


def _hold_out(train: Any, method: Method, seed: int) -> tuple[Tensor, Tensor | None]:
    """The training indices the trainer trains on, and those it holds out for the method
    (stratified by class for classification, seeded by ``train.seed``), if it asks for any."""
    n = len(train)
    fraction = method.held_out_fraction
    if fraction <= 0:
        return torch.arange(n), None
    if not fraction < 1:
        raise MMBalanceError(f"method {method.name!r} holds out {fraction} of the training split")
    targets = train.targets
    if targets.is_floating_point():
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=gen)
        cut = round((1 - fraction) * n)
        kept, held = order[:cut].sort().values, order[cut:].sort().values
    else:
        kept, held = stratified_split(targets, [1 - fraction, fraction], seed)
    if len(held) == 0 or len(kept) < 2:
        raise MMBalanceError(
            f"the training split ({n} samples) is too small to hold out {fraction:.0%} of it "
            f"for method {method.name!r}"
        )
    return kept, held


def gather_in_order(
    all_gather: Callable[[Tensor], Tensor], world_size: int, local: dict[str, Tensor]
) -> dict[str, Tensor]:
    """All-gather per-rank predictions of uneven length and restore dataset order (by
    ``local["index"]``); ``all_gather`` stacks a tensor of every rank, ``(world, ...)`` (Fabric's,
    or a Lightning strategy's)."""
    if world_size == 1:
        return local
    n = torch.tensor([local["index"].shape[0]], device=local["index"].device)
    sizes = all_gather(n).reshape(-1)
    longest = int(sizes.max())
    out: dict[str, Tensor] = {}
    for k, v in local.items():
        padded = torch.zeros((longest, *v.shape[1:]), dtype=v.dtype, device=v.device)
        padded[: v.shape[0]] = v
        gathered = all_gather(padded)  # (world, longest, ...)
        out[k] = torch.cat([gathered[r, : int(sizes[r])] for r in range(len(sizes))])
    order = torch.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


def load_state(module: nn.Module, state: Any, path: Path) -> None:
    """``module.load_state_dict(state)``, with a one-line error if the checkpoint's weights do
    not fit the model this configuration builds."""
    try:
        module.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, AttributeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"checkpoint {str(path)!r} does not match the run's model ({first})"
        ) from None


def encoder_state(model: MultimodalModel) -> dict[str, Tensor]:
    """A copy of the encoders' parameters and buffers (keys of ``model.encoders.state_dict()``)."""
    return {k: v.detach().clone() for k, v in model.encoders.state_dict().items()}


def _integer(value: Any) -> int | None:
    """``value`` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: The RNG state tensors of one process in ``last.ckpt``: name -> (dtype, length or None).
RNG_FIELDS: dict[str, tuple[torch.dtype, int | None]] = {
    "torch": (torch.uint8, None),
    "numpy_keys": (torch.int64, 624),
    "numpy_pos": (torch.int64, 2),
    "numpy_gauss": (torch.float64, 1),
    "python": (torch.int64, 626),
    "python_gauss": (torch.float64, 1),
}


def check_resume_fields(ckpt: Mapping[str, Any], epochs: int, world: int) -> str | None:
    """What is wrong with the resume fields of ``last.ckpt`` (None: nothing): the epoch it
    ended (0 <= epoch < ``epochs``), the step, one history row per epoch, step logs of earlier
    steps and epochs, the selection state (``best``: its key and an epoch not after the last,
    ``bad_epochs``) and one well-formed RNG state per process (``world``)."""
    epoch, step, bad = (_integer(ckpt.get(k)) for k in ("epoch", "step", "bad_epochs"))
    if epoch is None or not 0 <= epoch < epochs:
        return f"epoch {shown(ckpt.get('epoch'))} is not in 0..{epochs - 1}"
    if step is None or step < 0:
        return f"step {shown(ckpt.get('step'))} is not a count of steps"
    history = ckpt.get("history")
    if not isinstance(history, list) or len(history) != epoch + 1:
        return f"the history is not one row for each of the {epoch + 1} epochs"
    for i, row in enumerate(history):
        if not isinstance(row, dict) or not all(
            isinstance(k, str) and _number(v) for k, v in row.items()
        ):
            return f"history row {i} is not a row of numbers"
        if row.get("epoch") != i:
            return f"history row {i} is of epoch {shown(row.get('epoch'))}"
    logs = ckpt.get("step_logs")
    if not isinstance(logs, list):
        return "the step logs are not a list"
    for i, row in enumerate(logs):
        if not isinstance(row, dict) or not all(
            isinstance(k, str) and _number(v) for k, v in row.items()
        ):
            return f"step log {i} is not a row of numbers"
        s, e = _integer(row.get("step")), _integer(row.get("epoch"))
        if s is None or e is None or not (0 <= s < max(step, 1) and 0 <= e <= epoch):
            return f"step log {i} names step {shown(row.get('step'))} of epoch {shown(row.get('epoch'))}"
    best = ckpt.get("best")
    if best is not None:
        if not isinstance(best, dict) or set(best) != {"key", "epoch"}:
            return f"best {shown(best)} is not a selection state"
        key, at = best["key"], _integer(best["epoch"])
        if not (isinstance(key, list) and len(key) == 2 and all(map(_number, key))):
            return f"best key {shown(key)} is not two numbers"
        if at is None or not 0 <= at <= epoch:
            return f"best epoch {shown(best['epoch'])} is not in 0..{epoch}"
    if bad is None or not 0 <= bad <= epoch + 1:
        return f"bad_epochs {shown(ckpt.get('bad_epochs'))} is not in 0..{epoch + 1}"
    phase = ckpt.get("phase")
    if phase is not None and not isinstance(phase, str):
        return f"phase {shown(phase)} is not a name"
    rngs = ckpt.get("rng")
    if not isinstance(rngs, list) or len(rngs) != world:
        count = len(rngs) if isinstance(rngs, list) else "no list of"
        return f"it holds the RNG states of {count} processes, this run has {world}"
    for rank, state in enumerate(rngs):
        if not isinstance(state, dict):
            return f"the RNG state of rank {rank} is not a mapping"
        for name, (dtype, length) in RNG_FIELDS.items():
            t = state.get(name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
                return f"RNG state {name!r} of rank {rank} is not a vector of {dtype}"
            if length is not None and t.numel() != length:
                return f"RNG state {name!r} of rank {rank} has {t.numel()} values, not {length}"
    return None
