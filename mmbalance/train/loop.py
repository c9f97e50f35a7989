"""The training loop: one explicit loop for every method, on Lightning Fabric.

:class:`Trainer` runs the epochs of one run (built by :func:`mmbalance.train.runner.fit`); what it
writes besides checkpoints comes from its callbacks (:mod:`mmbalance.train.callbacks`). A run
directory holds::

    out_dir/config.yaml     the resolved configuration
    out_dir/last.ckpt       everything needed to resume (written atomically every epoch)
    out_dir/best.ckpt       the weights selected on the validation split (the model's and those
                            of the method's own module)
    out_dir/metrics.csv     one row per epoch (train loss terms, validation metrics, lr and,
                            with ``train.epoch_analysis``, per-modality curves: see
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn

import mmbalance
from mmbalance.build import data_fingerprint, normalized_config
from mmbalance.config import RunConfig
from mmbalance.data.base import Batch, DatasetBundle, stratified_split
from mmbalance.errors import DataError, MMBalanceError, NoSpaceLeft, TrainingDiverged, shown
from mmbalance.eval.analysis import analyze_model
from mmbalance.eval.metrics import selection_key, task_metrics
from mmbalance.eval.robustness import robustness_metrics
from mmbalance.io import is_written_file, write_json_atomic
from mmbalance.methods.base import (
    TRAINING_SPLITS,
    EpochContext,
    Method,
    Phase,
    SplitFeatures,
    StepContext,
    parameter_group_names,
    task_loss,
)
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import ModelOutput
from mmbalance.optim import OPTIMIZERS, build_optimizer, lr_factor
from mmbalance.train.batching import EpochBatchSampler, ShardBatchSampler, make_loader
from mmbalance.train.callbacks import Callback, default_callbacks
from mmbalance.train.checkpoint import (
    BEST_KEYS,
    LAST_KEYS,
    checkpoint_budget,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mmbalance.train.rundir import config_hash


@dataclass
class RunResult:
    """The outcome of one run: final metrics per split for the validation-selected model.

    ``config`` and ``data`` identify what was trained: the hash of the configuration
    (:func:`~mmbalance.train.rundir.config_hash`) and the fingerprint of the data
    (:func:`~mmbalance.build.data_fingerprint`); ``metrics.json`` records both, so
    that a comparison reuses a finished run only for the same configuration and data."""

    out_dir: Path
    metrics: dict[str, dict[str, float]]
    best_epoch: int
    epochs_run: int
    bayes_accuracy: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    config: str = ""
    data: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "bayes_accuracy": self.bayes_accuracy,
            "config": self.config,
            "data": self.data,
        }


class TrainingModule(nn.Module):
    """The model plus the method's own trainable modules, so DDP sees one module.

    Its forward runs the whole training computation (encoders, latent transform, heads, method
    losses), so every parameter used by a loss is inside the DDP forward.
    """

    def __init__(
        self, model: MultimodalModel, method: Method, method_module: nn.Module | None
    ) -> None:
        super().__init__()
        self.model = model
        self.method_module = method_module if method_module is not None else nn.Module()
        self._method = [method]  # a list keeps the method out of the module tree

    def forward(self, batch: Batch, ctx: StepContext) -> tuple[ModelOutput, dict[str, Tensor]]:
        method = self._method[0]
        latents = method.encode(self.model, batch.inputs, ctx)
        latents = method.transform_latents(latents, ctx)
        output = self.model.heads(latents)
        return output, method.losses(output, ctx)


class Trainer:
    """Runs the epochs of one run; see the module docstring for what it writes.

    ``method_module`` is what ``method.setup`` returned (optimised and checkpointed with the
    model). ``initial_encoder_state`` is the encoders' state as built, before any unimodal
    pre-training (``on_train_start`` receives it; without it, the encoders as they are at the
    start). ``callbacks`` observe the run (default: :func:`default_callbacks` of ``cfg``).
    """

    def __init__(
        self,
        fabric: Fabric,
        cfg: RunConfig,
        data: DatasetBundle,
        model: MultimodalModel,
        method: Method,
        method_module: nn.Module | None,
        out_dir: Path,
        initial_encoder_state: Mapping[str, Tensor] | None = None,
        callbacks: Sequence[Callback] | None = None,
    ) -> None:
        self.fabric, self.cfg, self.data = fabric, cfg, data
        self.data_fingerprint = data_fingerprint(cfg, data)  # recorded in what the run writes
        self.method, self.out_dir = method, out_dir
        self.model = model
        self.initial_encoder_state = initial_encoder_state
        t = cfg.train
        self.callbacks = list(default_callbacks(cfg) if callbacks is None else callbacks)
        module = TrainingModule(model, method, method_module)
        self.method_module = module.method_module
        # named parameter groups (see mmbalance.methods.base); parameters frozen before the
        # trainer is built (frozen encoders) stay out of the optimizer
        self.groups = _parameter_groups(model, method_module)
        if not any(self.groups.values()):
            raise MMBalanceError("the model has no trainable parameters")
        self.optimizer = build_optimizer(_param_groups(self.groups), cfg.train)
        self.module, self.optimizer = fabric.setup(module, self.optimizer)
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
        self.phase: Phase | None = None
        self._epoch = 0  # the epoch of the last epoch context (seeds feature-pass subsets)
        # fixed for the run (frozen encoders are frozen before the trainer is built)
        self.encoder_params = model.encoder_parameters()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.step_logs: list[dict[str, float]] = []
        self.best: dict[str, Any] | None = None
        self.bad_epochs = 0
        self.start_epoch = 0
        self.saved_epoch: int | None = None  # the epoch last.ckpt holds (None: none saved)

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
            self._enter_phase(epoch)
            start_ctx = self.epoch_context(epoch)
            self.method.on_epoch_start(start_ctx)
            lr, lr_scales = self._set_lr(epoch)
            train_stats = self._train_epoch(epoch)
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
                    "epoch": epoch,
                    "data": self.data_fingerprint,
                }
                self._save("best.ckpt", best)
            else:
                self.bad_epochs += 1
            end_ctx = self.epoch_context(epoch, val)
            self.method.on_epoch_end(end_ctx)
            row = {"epoch": epoch, "lr": lr, **lr_scales, **train_stats}
            row |= {f"val_{k}": v for k, v in val.items()}
            row |= {f"method_{k}": v for k, v in {**start_ctx.logs, **end_ctx.logs}.items()}
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            stopped = t.patience is not None and self.bad_epochs >= t.patience
            self._save("last.ckpt", self._snapshot(epoch))
            self.saved_epoch = epoch
            for callback in self.callbacks:
                callback.on_epoch_end(self, row)
        return self._finish()

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        fabric = self.fabric
        self.train_mode()
        self.train_sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        count = 0
        loader = self.loaders["train"]
        batches = len(loader)
        for batch in loader:
            terms = self.train_step(batch.to(fabric.device), epoch, count / batches)
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

    def train_step(self, batch: Batch, epoch: int, progress: float = 0.0) -> dict[str, float]:
        """One optimisation step on ``batch`` (already on the device): the method's forward
        transformation and losses, its backward and gradient rewrite, clipping, the optimizer
        step. ``progress`` is the fraction of the epoch's batches before this one. Returns the
        loss terms as floats. The cost benchmark times exactly this call.
        """
        ctx = self._context(batch, epoch, progress)
        terms: dict[str, float] = {}
        for part in self.method.step_parts(ctx):
            ctx.part = part
            self.optimizer.zero_grad(set_to_none=True)
            _, losses = self.module(batch, ctx)
            self.method.backward(losses, ctx)
            self.method.rewrite_gradients(ctx)
            if self.cfg.train.grad_clip is not None:
                self.fabric.clip_gradients(
                    self.module, self.optimizer, max_norm=self.cfg.train.grad_clip
                )
            # Read the loss terms once, after the step is queued (one synchronisation per step),
            # as their mean over ranks under DDP (the global batch's loss, and the same value, so
            # the same decision, on every rank). A non-finite loss stops the run before anything
            # of this step is saved, so the last checkpoint on disk stays the last good one.
            stacked = torch.stack([term.detach().reshape(()).float() for term in losses.values()])
            if self.fabric.world_size > 1:
                stacked = self.fabric.all_reduce(stacked, reduce_op="mean")
            part_terms = dict(zip(losses, stacked.tolist(), strict=True))
            value = sum(part_terms.values())
            if not math.isfinite(value):
                raise self._diverged(f"loss became {value} at epoch {epoch}, step {self.step}")
            self.optimizer.step()
            for name, term_value in part_terms.items():
                terms[name] = terms.get(name, 0.0) + term_value
        if ctx.logs:
            logged = {k: float(v) for k, v in ctx.logs.items()}
            self.step_logs.append({"step": self.step, "epoch": epoch, **logged})
        self.step += 1
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

    def _context(self, batch: Batch, epoch: int, progress: float = 0.0) -> StepContext:
        fabric = self.fabric
        return StepContext(
            targets=batch.targets,
            task=self.data.task,
            fusion=self.model.fusion,
            encode=self.model.encode,
            inputs=batch.inputs,
            encoder_params=self.encoder_params,
            epoch=epoch,
            step=self.step,
            backward=lambda loss: fabric.backward(loss),
            all_reduce=lambda x: fabric.all_reduce(x, reduce_op="sum"),
            world_size=fabric.world_size,
            regression_loss=self.cfg.train.regression_loss,
            index=batch.index,
            epoch_progress=progress,
        )

    # --- passes over a split ---------------------------------------------------------------------
    def split_outputs(self, split: str, latents: bool = False) -> dict[str, Tensor]:
        """Outputs of the current weights on ``split`` (``val`` or ``test``), each sample once,
        in dataset order.

        Returns ``prediction`` (what the method predicts), ``logits`` (the fused head's),
        ``targets``, ``index``, when the model has unimodal heads ``unimodal_<m>`` and, with
        ``latents``, the pooled latents ``latent_<m>`` (gathered like the rest, so every rank
        holds all of them).
        """
        return self._pass(self.loaders[split], latents)

    @torch.no_grad()
    def _pass(self, loader: Any, latents: bool) -> dict[str, Tensor]:
        fabric = self.fabric
        was_training = self.module.training
        self.module.eval()
        parts: dict[str, list[Tensor]] = {}
        autocast = fabric.autocast() if self.cfg.train.precision != "32-true" else nullcontext()
        for batch in loader:
            batch = batch.to(fabric.device)
            with autocast:
                output = self.model.heads(self.method.encode_eval(self.model, batch.inputs))
            pieces = {
                "prediction": self.method.predict(output).float(),
                "logits": output.logits.float(),
                "targets": batch.targets,
                "index": batch.index,
            }
            pieces |= {f"unimodal_{m}": u.float() for m, u in output.unimodal_logits.items()}
            if latents:
                pieces |= {f"latent_{m}": z.float() for m, z in output.latents.items()}
            for k, v in pieces.items():
                parts.setdefault(k, []).append(v)
        if was_training:
            self.train_mode()
        local = {k: torch.cat(v) for k, v in parts.items()}
        return _gather_once(fabric, local)

    def features(self, split: str, fraction: float = 1.0) -> SplitFeatures:
        """A no-grad, eval-mode pass over ``split`` for the method's epoch hooks (see
        :class:`~mmbalance.methods.base.EpochContext`); never the test split."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        dataset, index = self._training_split(split)
        if fraction < 1.0:
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 7_919 + self._epoch)
            keep = max(1, round(fraction * len(index)))
            index = index[torch.randperm(len(index), generator=gen)[:keep]].sort().values
        sampler = ShardBatchSampler(
            len(index),
            2 * self.cfg.train.batch_size,
            self.fabric.global_rank,
            self.fabric.world_size,
            indices=index,
        )
        out = self._pass(make_loader(dataset, sampler, 0), latents=True)
        modalities = self.model.modalities
        return SplitFeatures(
            latents={m: out[f"latent_{m}"] for m in modalities},
            logits=out["logits"],
            unimodal_logits={m: out[f"unimodal_{m}"] for m in self.model.unimodal_heads},
            targets=out["targets"],
            index=out["index"],
        )

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
        self._epoch = epoch
        fabric = self.fabric
        return EpochContext(
            epoch=epoch,
            model=self.model,
            features=self.features,
            batches=self.split_batches,
            val_metrics=dict(val_metrics or {}),
            history=list(self.history),
            encoder_params=self.encoder_params,
            all_reduce=lambda x: fabric.all_reduce(x, reduce_op="sum"),
            world_size=fabric.world_size,
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

    def _finish(self) -> RunResult:
        best_epoch = -1
        if self.best is not None:
            best = self.out_dir / "best.ckpt"
            budget = checkpoint_budget(self.model, self.method_module)
            state = load_checkpoint(best, BEST_KEYS, budget)
            load_state(self.model, state["model"], best)
            if "method_module" in state:  # methods whose own module shapes the prediction
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
            metrics["test"] |= robustness_metrics(
                self.model.heads,
                splits["test"],
                self.method.predict_missing,
                lambda inputs: self.method.encode_eval(self.model, inputs),
                self.model.modalities,
                task=self.data.task,
                device=self.fabric.device,
                batch_size=2 * self.cfg.train.batch_size,
            )
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
            # what was trained: the configuration (checked on resume) and the data
            "config": json.dumps(normalized_config(self.cfg), sort_keys=True),
            "data": self.data_fingerprint,
            "version": mmbalance.__version__,
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
        set_rng_state(rngs[self.fabric.global_rank])
        self.saved_epoch = self.start_epoch - 1
        if phase_name is not None:
            # the phase the last epoch ran in: the next epoch resets the optimizer exactly when
            # an uninterrupted run would
            self.phase = replace(self.method.phase(self.start_epoch - 1), name=str(phase_name))

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

    def _enter_phase(self, epoch: int) -> None:
        """Apply the method's phase for ``epoch``: which parameter groups train and, at a stage
        boundary that asks for it, a fresh optimizer."""
        phase = self.method.phase(epoch)
        if self.phase is not None and phase.name != self.phase.name and phase.reset_optimizer:
            fresh = build_optimizer(_param_groups(self.groups), self.cfg.train)
            self.optimizer = self.fabric.setup_optimizers(fresh)
        self.phase = phase
        for name, params in self.groups.items():
            trainable = phase.trainable is None or name in phase.trainable
            for param in params:
                param.requires_grad_(trainable)

    def _set_lr(self, epoch: int) -> tuple[float, dict[str, float]]:
        """Set every group's learning rate for ``epoch``; returns the base rate and the method's
        multipliers (as ``lr_scale_<group>`` columns)."""
        lr = self.cfg.train.lr * lr_factor(self.cfg.train, epoch)
        scales = dict(self.method.lr_scales())
        unknown = set(scales) - set(self.groups)
        if unknown:
            raise MMBalanceError(
                f"method {self.method.name!r} scales unknown parameter groups {sorted(unknown)}; "
                f"groups: {', '.join(self.groups)}"
            )
        trainable = self.phase.trainable if self.phase is not None else None
        for group in self.optimizer.param_groups:
            name = group["name"]
            active = trainable is None or name in trainable
            group["lr"] = lr * scales.get(name, 1.0) if active else 0.0
        return lr, {f"lr_scale_{k}": float(v) for k, v in scales.items()}

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


def _parameter_groups(
    model: MultimodalModel, method_module: nn.Module | None
) -> dict[str, list[nn.Parameter]]:
    """The trainer's named parameter groups (see :mod:`mmbalance.methods.base`), each holding
    the parameters that train at construction time."""
    modules: dict[str, nn.Module | None] = {
        f"encoder.{m}": model.encoders[m] for m in model.modalities
    }
    modules |= {f"unimodal_head.{m}": h for m, h in model.unimodal_heads.items()}
    modules |= {"fusion": model.fusion, "method": method_module}
    expected = parameter_group_names(model.modalities, bool(model.unimodal_heads))
    assert list(modules) == expected, (list(modules), expected)
    return {
        name: [p for p in module.parameters() if p.requires_grad] if module is not None else []
        for name, module in modules.items()
    }


def _param_groups(groups: Mapping[str, list[nn.Parameter]]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one per named group (its ``name`` key)."""
    return [{"params": params, "name": name} for name, params in groups.items()]


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


def _gather_once(fabric: Fabric, local: dict[str, Tensor]) -> dict[str, Tensor]:
    """All-gather per-rank predictions of uneven length and restore dataset order."""
    if fabric.world_size == 1:
        return local
    n = torch.tensor([local["index"].shape[0]], device=fabric.device)
    sizes = fabric.all_gather(n).reshape(-1)
    longest = int(sizes.max())
    out: dict[str, Tensor] = {}
    for k, v in local.items():
        padded = torch.zeros((longest, *v.shape[1:]), dtype=v.dtype, device=v.device)
        padded[: v.shape[0]] = v
        gathered = fabric.all_gather(padded)  # (world, longest, ...)
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
