"""Any method in a Lightning project: :class:`BalancedModule`, a ``LightningModule``.

It wraps your encoders, fusion head and optional unimodal heads together with a registered
method, and trains them under ``lightning.Trainer`` exactly as our trainer does: underneath it is
a :class:`~mmbalance.methods.MethodAdapter` (which sees your parts as our model is seen) and its
:class:`~mmbalance.methods.protocol.TrainingProtocol` (the order of the method's hooks), with
Lightning as the engine::

    module = BalancedModule(
        "ogm_ge",
        encoders={"audio": audio_net, "video": video_net},
        fusion=build_fusion("concat_linear", {"audio": 16, "video": 16}, 4, {}),
        options={"alpha": 0.8},
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
    )
    lightning.Trainer(max_epochs=10).fit(module, train_loader, val_loader)

What Lightning does and what the module does:

- **optimisation is manual** (``automatic_optimization = False``): a method may rewrite the
  gradients between the backward and the optimizer step (OGM-GE, MMPareto) or take several steps
  per batch (MLA's one step per modality), so each training step runs the protocol's step
  (zero the gradients, the method's forward and losses, its backward through
  ``manual_backward``, its gradient rewrite, ``optimizer.step()``) once per part of the step;
- **the method's epoch hooks** run on Lightning's: ``on_train_start`` and ``on_epoch_start``
  (with the method's phase and learning-rate scales on the optimizer's named groups) in
  ``on_train_epoch_start``; ``on_epoch_end`` in ``on_train_epoch_end``, after the epoch's
  validation, with the validation metrics you logged as ``val_<name>`` or ``val/<name>``
  (``val_accuracy`` is ``accuracy`` to the method);
- **the method's scalars** go through ``self.log``: per step as ``method/<name>`` (OGM-GE's
  coefficients, ...) and the loss terms as ``train/<term>``; per epoch the scalars the method
  logged at the epoch's boundaries as ``method_epoch/<name>``;
- **DDP**: the engine's ``backward`` is ``manual_backward`` (so DDP averages the gradients),
  its ``all_reduce`` Lightning's sum over processes and its gather Lightning's ``all_gather``.
  Give each process its share of every batch (``mmbalance.train.batching.EpochBatchSampler``
  with the process's rank, and ``use_distributed_sampler=False``), as our trainer does;
- **checkpoints**: your modules and the method's own module are the LightningModule's
  parameters; the method's state (``method.state_dict()``), the step count, the phase, the
  epoch rows and each process's random-number state go into the checkpoint under
  ``"mmbalance"``, as tensors and plain values only, so that a checkpoint loads with
  ``trainer.fit(module, ckpt_path=..., weights_only=True)`` (no unpickling of anything but
  tensors and plain containers) and a resumed run continues exactly as an uninterrupted one
  (for a method whose epoch-start hooks draw no numbers from torch's global generator: Lightning
  makes a resumed run's first data iterator, one draw, before ``on_train_epoch_start``, and
  every other epoch's after it).
  Save at the end of a training epoch (what ``ModelCheckpoint`` does by default when
  validation runs once an epoch, or with ``save_on_train_epoch_end=True``): a checkpoint written
  inside an epoch, before the method's ``on_epoch_end``, cannot resume exactly and is refused.

``validation_step`` logs ``val_loss`` (the task loss of the fused logits) and, for
classification, ``val_accuracy`` (of what the method predicts); override it for other metrics.

Epochs are Lightning's (``self.current_epoch``); the learning rate of each named group is yours
(the optimizer's, or your scheduler's) times the method's scale, as
:meth:`~mmbalance.methods.MethodAdapter.begin_epoch` applies it. Unimodal pre-training (for the
methods that declare ``needs_unimodal_pretraining``) stays yours, as with the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, DataError

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - lightning is a dependency; a broken install lacks it
    raise ConfigError(
        "mmbalance.lightning needs Lightning (lightning.pytorch): pip install 'lightning>=2.4,<2.7'"
    ) from None

from mmbalance.data.base import Batch
from mmbalance.methods.adapter import MethodAdapter, SplitData
from mmbalance.methods.base import Method, Task, build_method, task_loss
from mmbalance.models.fusion import FusionHead
from mmbalance.train.checkpoint import plain, rng_state, set_rng_state
from mmbalance.train.loop import gather_in_order

#: Builds the optimizer from the named parameter groups (``encoder.<m>``, ``unimodal_head.<m>``,
#: ``fusion``, ``method``), e.g. ``lambda groups: torch.optim.SGD(groups, lr=0.05)``.
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

#: The key of the module's state in a Lightning checkpoint.
CHECKPOINT_KEY = "mmbalance"


def _adam(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=1e-3)


class BalancedModule(pl.LightningModule):
    """Your modules and a balancing method as a ``LightningModule`` (see the module docstring).

    Args:
        method: a registered method's name (its options from ``options``) or a
            :class:`~mmbalance.methods.Method`.
        encoders: one module per modality, mapping that modality's input to a ``(B, d)`` latent.
        fusion: a fusion head of ours (:func:`mmbalance.models.build_fusion`), or a module or
            function mapping the latents (a dict by modality) to ``(B, num_outputs)`` logits.
        unimodal_heads: one module per modality mapping its latent to logits (required by the
            methods that need them: mcr, mmpareto, ...).
        options: the method's options when ``method`` is a name.
        optimizer: builds the optimizer from the named parameter groups; default Adam at 1e-3.
        num_outputs: classes (1 for regression); default: the fusion head's.
        latent_dims: each encoder's latent size; default: the fusion head's, else each
            encoder's ``out_dim`` attribute.
        task: ``classification`` or ``regression``.
        regression_loss: ``l1`` or ``mse`` (regression only).
        splits: data for the epoch hooks' feature pass (see
            :class:`~mmbalance.methods.MethodAdapter`).
        model: the module that holds your parts, when the fusion is a function of layers
            outside them (all its parameters train); default: the parts themselves.

    A batch is an ``(inputs, targets)`` pair, ``inputs`` a dict by modality, or a
    :class:`~mmbalance.data.Batch` of our datasets (whose ``index`` some methods read).
    """

    def __init__(
        self,
        method: Method | str,
        encoders: Mapping[str, nn.Module],
        fusion: FusionHead | nn.Module | Callable[[dict[str, Tensor]], Tensor],
        unimodal_heads: Mapping[str, nn.Module] | None = None,
        *,
        options: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        num_outputs: int | None = None,
        latent_dims: Mapping[str, int] | None = None,
        task: Task = "classification",
        regression_loss: Literal["l1", "mse"] = "l1",
        splits: Mapping[str, SplitData] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if isinstance(method, str):
            method = build_method(method, options or {})
        elif options:
            raise ConfigError("options= applies to a method given by name only")
        if model is None:
            parts = {"encoders": nn.ModuleDict(dict(encoders))}
            if isinstance(fusion, nn.Module):
                parts["fusion"] = fusion
            if unimodal_heads is not None:
                parts["unimodal_heads"] = nn.ModuleDict(dict(unimodal_heads))
            model = nn.ModuleDict(parts)
        self.adapter = MethodAdapter(
            method,
            model,
            encoders=encoders,
            fusion=fusion,
            unimodal_heads=unimodal_heads,
            num_outputs=num_outputs,
            latent_dims=latent_dims,
            task=task,
            regression_loss=regression_loss,
            splits=splits,
        )
        if method.grows_module:
            raise ConfigError(
                f"method {method.name!r} adds parameters while it trains, which a Lightning "
                "optimizer and checkpoint cannot follow: train it with mmbalance's fit or the adapter"
            )
        self.method = method
        #: your modules and the method's own module (what Lightning moves, wraps and saves)
        self.step_module = self.adapter.protocol.module
        self.user_model = model
        self.optimizer_factory = optimizer or _adam

    # --- Lightning's hooks ---------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.adapter.param_groups())

    def setup(self, stage: str) -> None:
        """Lightning as the protocol's engine (in each process, once the strategy exists)."""
        protocol = self.adapter.protocol
        protocol.backward = self.manual_backward
        protocol.all_reduce = self._sum_over_processes
        protocol.world_size = self.trainer.world_size
        protocol.gather = self._gather

    def _sum_over_processes(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def _gather(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        return gather_in_order(self.trainer.strategy.all_gather, self.trainer.world_size, local)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """What the method predicts for ``inputs`` (evaluation mode; modes restored)."""
        return self.adapter.predict(inputs)

    def on_train_epoch_start(self) -> None:
        self.adapter.begin_epoch(self.current_epoch, self._optimizer())
        if self.adapter.subsets is not None:
            raise ConfigError(
                f"method {self.method.name!r} re-samples each epoch's training data, which a "
                "Lightning dataloader cannot: train it with mmbalance's fit or the adapter"
            )
        if self.method.freezes_encoders:
            self.adapter.model.encoders.eval()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets, index = _unpack(batch)
        fields: dict[str, Any] = {}
        if index is not None:
            fields["index"] = index
        batches = self.trainer.num_training_batches
        if isinstance(batches, int) and batches > 0:
            fields["epoch_progress"] = batch_idx / batches
        protocol = self.adapter.protocol
        ctx = protocol.context(targets, inputs, self.current_epoch, **fields)
        terms = protocol.run_step(ctx, self._optimizer())
        batch_size = int(targets.shape[0])
        self.log("train/loss", sum(terms.values()), prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        for name, value in ctx.logs.items():
            self.log(f"method/{name}", float(value), batch_size=batch_size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """The task loss of the fused logits as ``val_loss`` and, for classification, the
        accuracy of what the method predicts as ``val_accuracy`` (averaged over processes)."""
        inputs, targets, _ = _unpack(batch)
        output = self.adapter.protocol.eval_output(inputs)
        n = int(targets.shape[0])
        loss = task_loss(output.logits, targets, self.adapter.task, self.adapter.regression_loss)
        self.log("val_loss", loss, batch_size=n, sync_dist=True)
        if self.adapter.task == "classification":
            correct = self.method.predict(output).argmax(1) == targets
            self.log("val_accuracy", correct.float().mean(), batch_size=n, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        val = {
            k[4:]: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if k[:4] in ("val_", "val/") and v.numel() == 1
        }
        self.adapter.end_epoch(self.current_epoch, val)
        row = self.adapter.history[-1]
        for name, value in row.items():
            if name.startswith("method_"):
                self.log(f"method_epoch/{name.removeprefix('method_')}", float(value))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The method's state and each process's random-number state, as plain values."""
        local = rng_state()
        world = self.trainer.world_size
        if world > 1:  # every process dumps the checkpoint; the first one writes it
            gathered = self.all_gather(local)
            rngs = [{k: v[r].cpu().clone() for k, v in gathered.items()} for r in range(world)]
        else:
            rngs = [local]
        state = self.adapter.state_dict()
        checkpoint[CHECKPOINT_KEY] = plain({**state, "rng": rngs}, CHECKPOINT_KEY)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(state, dict):
            raise DataError(
                f"the checkpoint holds no {CHECKPOINT_KEY!r} state: it was not written by a "
                "BalancedModule"
            )
        if state.get("epoch_open"):
            raise DataError(
                "the checkpoint was written inside an epoch, before the method's on_epoch_end, "
                "and cannot resume exactly: save at the end of training epochs "
                "(ModelCheckpoint(save_on_train_epoch_end=True))"
            )
        rngs = state.get("rng")
        world = self.trainer.world_size if self._trainer is not None else 1
        if not isinstance(rngs, list) or len(rngs) != world:
            raise DataError(
                f"the checkpoint holds the random-number states of "
                f"{len(rngs) if isinstance(rngs, list) else 'no list of'} processes; this run "
                f"has {world}"
            )
        self.adapter.load_state_dict(state)
        # before Lightning makes the first epoch's data iterator (one draw of the generator, as
        # the uninterrupted run's next epoch makes it)
        set_rng_state(rngs[self.global_rank])

    def _optimizer(self) -> Any:
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise ConfigError("BalancedModule trains with one optimizer over its named groups")
        return optimizer


def _unpack(batch: Any) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """``(inputs, targets, index or None)`` of a :class:`Batch` or an ``(inputs, targets)``
    pair."""
    if isinstance(batch, Batch):
        return dict(batch.inputs), batch.targets, batch.index
    if isinstance(batch, list | tuple) and len(batch) == 2 and isinstance(batch[0], Mapping):
        return dict(batch[0]), batch[1], None
    raise ConfigError(
        "a BalancedModule batch is an (inputs, targets) pair with inputs a dict by modality, "
        f"or a mmbalance Batch; got {type(batch).__name__}"
    )


__all__ = ["CHECKPOINT_KEY", "BalancedModule", "OptimizerFactory"]
