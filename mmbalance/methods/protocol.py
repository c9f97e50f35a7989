"""The training protocol: in which order a method's hooks run, written once.

Our trainer (:class:`mmbalance.train.loop.Trainer`) and a user's own loop
(:class:`mmbalance.methods.adapter.MethodAdapter`) both hand their model and method to one
:class:`TrainingProtocol`, which runs

- **a training step** (:meth:`TrainingProtocol.run_step`): for each part of the step
  (:meth:`~mmbalance.methods.base.Method.step_parts`), zero the gradients, the forward
  (:class:`StepModule`: the method's ``encode`` and ``transform_latents``, the heads, the method's
  ``losses``), the method's ``backward`` and ``rewrite_gradients``, what the caller does before
  the optimizer step (clipping, reading the losses), ``optimizer.step()``;
- **an epoch boundary** (:meth:`TrainingProtocol.begin_epoch`, :meth:`TrainingProtocol.end_epoch`):
  the method's phase (which parameter groups train, and a fresh optimizer state at a stage that
  asks for one), ``on_epoch_start``, the epoch's subsets (``epoch_subsets``, checked), the
  parameters the method's module gained, the learning rate of every named group with the
  method's scales; after validation ``on_epoch_end``, the parameters gained again, and the
  epoch's row of method scalars;
- **a growing module** (:meth:`TrainingProtocol.adopt_new_parameters`,
  :meth:`TrainingProtocol.restore_module_layout`): parameters that the method's module gains
  join the ``method`` group and the optimizer, and a saved layout is rebuilt (and adopted)
  before saved weights and optimizer state are loaded;
- **the feature pass** (:meth:`TrainingProtocol.outputs`, :meth:`TrainingProtocol.features`): a
  no-grad, eval-mode pass through ``method.encode_eval`` and the heads, for the epoch hooks, the
  validation and the test.

What differs between the two callers is only what they plug in: the engine (``backward``,
``all_reduce``, ``gather``, ``autocast``: Lightning Fabric's in our trainer, plain PyTorch in a
user's loop), the forward (our trainer's is the Fabric-wrapped, possibly DDP, :class:`StepModule`),
where the data come from (the batches of an epoch's subsets included) and what happens before
the optimizer step. A compiled step (``train.compile``) replaces
:attr:`TrainingProtocol.forward` by ``torch.compile`` of it; the forward returns the losses
alone, so no parameter a loss does not use gets a zero gradient (a compiled graph hands zeros
to every output it returns that the loss leaves out). The sequence around it stays as it is.
The protocol adds no tensor operation to a step: it runs the method's hooks and the caller's,
nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.methods.base import (
    EpochContext,
    EpochSubset,
    FeaturePass,
    Method,
    Phase,
    SplitBatches,
    SplitFeatures,
    StepContext,
    Task,
    parameter_groups,
)
from mmbalance.methods.ops.modes import eval_mode
from mmbalance.models.output import ModelOutput

if TYPE_CHECKING:
    from mmbalance.data.base import Batch

#: What runs right before ``optimizer.step()`` in each part of a step; it gets the part's loss
#: terms and returns their values as floats (our trainer clips gradients, averages the terms over
#: processes and stops a diverged run here).
BeforeStep = Callable[[Mapping[str, Tensor]], dict[str, float]]


def loss_values(losses: Mapping[str, Tensor]) -> dict[str, float]:
    """The loss terms as floats, read in one transfer."""
    stacked = torch.stack([term.detach().reshape(()).float() for term in losses.values()])
    return dict(zip(losses, stacked.tolist(), strict=True))


def _same(local: dict[str, Tensor]) -> dict[str, Tensor]:
    return local


def _plain_backward(loss: Tensor) -> None:
    loss.backward()


def _sum_all_reduce(t: Tensor) -> Tensor:
    return t


@dataclass
class EpochStart:
    """What :meth:`TrainingProtocol.begin_epoch` settled for the coming epoch.

    Attributes:
        scales: the method's learning-rate scales by parameter group.
        subsets: the method's subsets of the epoch (:meth:`~mmbalance.methods.base.Method.
            epoch_subsets`), checked, with CPU integer indices, to train one after the other;
            ``None``: the usual epoch over the whole training split.
    """

    scales: dict[str, float]
    subsets: list[EpochSubset] | None


class StepModule(nn.Module):
    """The model plus the method's own trainable module, so that DDP sees one module.

    Its forward is the whole differentiable computation of a step (encoders through the method,
    the method's latent transform, the heads, the method's losses), so every parameter a loss
    uses is inside the DDP forward. It returns the losses alone: DDP looks for the parameters a
    step leaves unused from what the forward returns, and an output that the losses skip (the
    fusion head in MIDAS's warm-up) would count as used, so the gradient reduction would wait
    for a gradient that never comes.
    """

    def __init__(self, model: nn.Module, method: Method, method_module: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.method_module = method_module if method_module is not None else nn.Module()
        self._method = [method]  # a list keeps the method out of the module tree

    def output(self, inputs: Mapping[str, Tensor], ctx: StepContext) -> ModelOutput:
        """The training output: the method's ``encode`` and ``transform_latents``, the heads."""
        method = self._method[0]
        latents = method.encode(self.model, inputs, ctx)
        latents = method.transform_latents(latents, ctx)
        return self.model.heads(latents)  # type: ignore[operator]

    def forward(self, inputs: Mapping[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        return self._method[0].losses(self.output(inputs, ctx), ctx)


class TrainingProtocol:
    """A method training a model: the step, the epoch boundaries and the feature pass.

    Args:
        method: the method, set up already (``method.setup`` returned ``method_module``).
        model: a :class:`~mmbalance.models.MultimodalModel` (``modalities``, ``encoders``,
            ``unimodal_heads``, ``fusion``, ``encode``, ``heads``, ``encoder_parameters``).
        method_module: what ``method.setup`` returned (trained with the model), or ``None``.
        task: ``classification`` or ``regression``.
        regression_loss: ``l1`` or ``mse``.
        seed: seeds the feature pass's random subsets (with the epoch).
        other_parameters: parameters of a user's model outside its encoders, heads and fusion;
            they train in the ``fusion`` group.
        other_modules: modules outside the model whose training mode the feature pass switches
            too (a user's model whose fusion function uses its layers).

    Attributes:
        forward: the forward of a step, ``forward(inputs, ctx) -> losses``:
            :attr:`module` itself unless the caller wraps it (our trainer: Fabric's wrapper, for
            DDP and precision; a compiled step: ``torch.compile`` of it).
        backward, all_reduce, world_size, gather, autocast: the engine: how a loss is
            differentiated, a tensor summed over processes, per-process outputs gathered (in
            dataset order) and a pass put under mixed precision; plain single-process PyTorch by
            default.
        groups: the named parameter groups (``encoder.<m>``, ``unimodal_head.<m>``, ``fusion``,
            ``method``).
        phase: the phase of the last epoch begun (``None`` before the first).
        step: the global step count (one per batch, whatever its number of parts).
        epoch: the epoch of the last epoch context (seeds the feature pass's subsets).
    """

    def __init__(
        self,
        method: Method,
        model: nn.Module,
        method_module: nn.Module | None = None,
        *,
        task: Task = "classification",
        regression_loss: Literal["l1", "mse"] = "l1",
        seed: int = 0,
        other_parameters: Iterable[nn.Parameter] = (),
        other_modules: Sequence[nn.Module] = (),
    ) -> None:
        self.method = method
        self.model = model
        self.module = StepModule(model, method, method_module)
        self.forward: Callable[..., dict[str, Tensor]] = self.module
        self.task: Task = task
        self.regression_loss = regression_loss
        self.seed = seed
        self.other_modules = list(other_modules)
        self.backward: Callable[[Tensor], None] = _plain_backward
        self.all_reduce: Callable[[Tensor], Tensor] = _sum_all_reduce
        self.world_size = 1
        self.gather: Callable[[dict[str, Tensor]], dict[str, Tensor]] = _same
        self.autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
        #: parameters frozen now (frozen encoders) stay out of every group
        self.groups = parameter_groups(model, method_module, other_parameters)
        #: fixed for the run (frozen encoders are frozen before the protocol is built)
        self.encoder_params: dict[str, list[nn.Parameter]] = model.encoder_parameters()  # type: ignore[operator]
        self.phase: Phase | None = None
        self.step = 0
        self.epoch = 0

    @property
    def method_module(self) -> nn.Module:
        """The method's own module (an empty module for methods without one)."""
        return self.module.method_module

    def param_groups(self, keep_empty: bool = False, **settings: Any) -> list[dict[str, Any]]:
        """The named groups as optimizer parameter groups (each with its ``name``), ``settings``
        in every group; empty groups are left out unless ``keep_empty``."""
        return [
            {"params": params, "name": name, **settings}
            for name, params in self.groups.items()
            if params or keep_empty
        ]

    # --- the step --------------------------------------------------------------------------------
    def context(
        self,
        targets: Tensor,
        inputs: Mapping[str, Tensor] | None,
        epoch: int,
        **fields: Any,
    ) -> StepContext:
        """The :class:`StepContext` of the next step; ``fields`` sets any further field
        (``index``, ``epoch_progress``)."""
        return StepContext(
            targets=targets,
            task=self.task,
            fusion=self.model.fusion,  # type: ignore[arg-type]
            encode=self.model.encode,  # type: ignore[arg-type]
            inputs=inputs,
            encoder_params=self.encoder_params,
            epoch=epoch,
            step=self.step,
            backward=self.backward,
            all_reduce=self.all_reduce,
            world_size=self.world_size,
            regression_loss=self.regression_loss,
            **fields,
        )

    def run_step(
        self,
        ctx: StepContext,
        optimizer: torch.optim.Optimizer,
        before_step: BeforeStep = loss_values,
    ) -> dict[str, float]:
        """One training step on ``ctx.inputs`` (see the module docstring); returns the loss terms
        as floats, summed over the step's parts, and counts the step."""
        if ctx.inputs is None:
            raise ValueError("a training step needs the batch's inputs in its StepContext")
        terms: dict[str, float] = {}
        for part in self.method.step_parts(ctx):
            ctx.part = part
            optimizer.zero_grad(set_to_none=True)
            losses = self.forward(ctx.inputs, ctx)
            self.method.backward(losses, ctx)
            self.method.rewrite_gradients(ctx)
            part_terms = before_step(losses)
            optimizer.step()
            for name, value in part_terms.items():
                terms[name] = terms.get(name, 0.0) + value
        self.step += 1
        return terms

    # --- epoch boundaries --------------------------------------------------------------------------
    def epoch_context(
        self,
        epoch: int,
        features: FeaturePass,
        batches: SplitBatches,
        val_metrics: Mapping[str, float] | None = None,
        history: Sequence[Mapping[str, float]] = (),
    ) -> EpochContext:
        """The context of the epoch hooks for ``epoch`` (which also seeds the feature pass)."""
        self.epoch = epoch
        return EpochContext(
            epoch=epoch,
            model=self.model,
            features=features,
            batches=batches,
            val_metrics=dict(val_metrics or {}),
            history=list(history),
            encoder_params=self.encoder_params,
            all_reduce=self.all_reduce,
            world_size=self.world_size,
        )

    def begin_epoch(
        self,
        ctx: EpochContext,
        optimizer: torch.optim.Optimizer | None,
        base_lr: Callable[[dict[str, Any]], float],
        train_index: Tensor | None = None,
    ) -> EpochStart:
        """Before the steps of ``ctx.epoch``: the method's phase (which groups train; at a stage
        boundary that asks for it, the optimizer's state is cleared, as a new optimizer's is
        empty), ``on_epoch_start``, the method's subsets of the epoch (each a 1-D integer index,
        of samples in ``train_index`` when given), the parameters its module gained (see
        :meth:`adopt_new_parameters`), then every named optimizer group's learning rate,
        ``base_lr(group)`` times the method's scale of the group (0 for a group that does not
        train in this phase). Returns the method's scales and the epoch's subsets."""
        phase = self.method.phase(ctx.epoch)
        changed = self.phase is not None and phase.name != self.phase.name
        if changed and phase.reset_optimizer and optimizer is not None:
            optimizer.state.clear()
        self.phase = phase
        for name, params in self.groups.items():
            trainable = phase.trainable is None or name in phase.trainable
            for p in params:
                p.requires_grad_(trainable)
        self.method.on_epoch_start(ctx)
        subsets = self.epoch_subsets(ctx, train_index)
        self.adopt_new_parameters(optimizer)
        scales = {name: float(v) for name, v in self.method.lr_scales().items()}
        unknown = set(scales) - set(self.groups)
        if unknown:
            raise ConfigError(
                f"method {self.method.name!r} scales unknown parameter groups {sorted(unknown)}; "
                f"groups: {', '.join(self.groups)}"
            )
        if optimizer is not None:
            for group in optimizer.param_groups:
                name = group.get("name")
                if name not in self.groups:
                    continue
                active = phase.trainable is None or name in phase.trainable
                group["lr"] = base_lr(group) * scales.get(name, 1.0) if active else 0.0
        return EpochStart(scales, subsets)

    def epoch_subsets(
        self, ctx: EpochContext, train_index: Tensor | None = None
    ) -> list[EpochSubset] | None:
        """The method's subsets of ``ctx.epoch`` (``None``: the whole split), checked: each a
        1-D integer index (of samples in ``train_index`` when given), returned on the CPU."""
        subsets = self.method.epoch_subsets(ctx)
        if subsets is None:
            return None
        checked = []
        for subset in subsets:
            index = subset.index if isinstance(subset, EpochSubset) else None
            if (
                not isinstance(index, Tensor)
                or index.dim() != 1
                or index.is_floating_point()
                or (
                    train_index is not None and not bool(torch.isin(index.cpu(), train_index).all())
                )
            ):
                raise MMBalanceError(
                    f"method {self.method.name!r} returned an epoch subset that is not a 1-D "
                    "index of samples it trains on"
                )
            checked.append(EpochSubset(str(subset.name), index.cpu().long()))
        return checked

    # --- a growing module ----------------------------------------------------------------------
    def adopt_new_parameters(self, optimizer: torch.optim.Optimizer | None) -> list[nn.Parameter]:
        """Give the parameters that the method's module gained since the last call (methods
        that declare ``grows_module``) to the ``method`` group, trainable unless the current
        phase freezes that group, and to ``optimizer``'s group named ``method`` (a new group of
        that name if it has none), with a fresh optimizer state. Returns them (none for most
        methods)."""
        if not self.method.grows_module:
            return []
        known = {id(p) for params in self.groups.values() for p in params}
        new = [p for p in self.method_module.parameters() if p.requires_grad and id(p) not in known]
        if not new:
            return []
        phase = self.phase
        trainable = phase is None or phase.trainable is None or "method" in phase.trainable
        for p in new:
            p.requires_grad_(trainable)
        self.groups["method"].extend(new)
        if optimizer is not None:
            group = next((g for g in optimizer.param_groups if g.get("name") == "method"), None)
            if group is None:
                optimizer.add_param_group({"params": new, "name": "method"})
            else:
                group["params"].extend(new)
        return new

    def restore_module_layout(
        self, layout: Mapping[str, Any], optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Rebuild the method's module to a saved :meth:`~mmbalance.methods.base.Method.
        module_layout` and adopt what it gained, before the weights and the optimizer state saved
        with that layout are loaded."""
        self.method.restore_module_layout(layout)
        self.adopt_new_parameters(optimizer)

    def resume_phase(self, name: str | None, epoch: int) -> None:
        """After a resume: the phase the last epoch (``epoch``) ran in was called ``name``, so
        that the next epoch clears the optimizer exactly when an uninterrupted run would."""
        if name is not None:
            phase = self.method.phase(epoch)
            self.phase = Phase(str(name), phase.trainable, phase.reset_optimizer)

    def end_epoch(
        self,
        start: EpochContext,
        end: EpochContext,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> dict[str, float]:
        """After ``end.epoch``'s validation (in ``end.val_metrics``): ``on_epoch_end``, then the
        parameters the method's module gained go to ``optimizer`` (so that a checkpoint saved
        now holds them in the optimizer too); returns the epoch's row: ``epoch``,
        ``val_<metric>`` and the scalars the method logged at either boundary, as
        ``method_<name>``."""
        self.method.on_epoch_end(end)
        self.adopt_new_parameters(optimizer)
        row: dict[str, float] = {"epoch": end.epoch}
        row |= {f"val_{k}": v for k, v in end.val_metrics.items()}
        row |= {f"method_{k}": v for k, v in {**start.logs, **end.logs}.items()}
        return row

    # --- the feature pass -------------------------------------------------------------------------
    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the model, the method's module and :attr:`other_modules`; every
        submodule's mode is restored afterwards (frozen encoders stay in eval mode)."""
        with eval_mode(self.module, *self.other_modules):
            yield

    @torch.no_grad()
    def eval_output(self, inputs: Mapping[str, Tensor]) -> ModelOutput:
        """The model's output at evaluation, ``heads(method.encode_eval(model, inputs))``, without
        gradients (the caller sets eval mode: :meth:`evaluating`)."""
        with self.autocast():
            return self.model.heads(self.method.encode_eval(self.model, inputs))  # type: ignore[operator]

    @torch.no_grad()
    def outputs(self, batches: Iterable[Batch], latents: bool = False) -> dict[str, Tensor]:
        """A no-grad, eval-mode pass over ``batches`` (on the model's device), gathered over
        processes in dataset order: ``prediction`` (what the method predicts), ``logits`` (the
        fusion head's), ``targets``, ``index``, ``unimodal_<m>`` for models with unimodal heads
        and, with ``latents``, the pooled latents ``latent_<m>``."""
        parts: dict[str, list[Tensor]] = {}
        with self.evaluating():
            for batch in batches:
                output = self.eval_output(batch.inputs)
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
        if not parts:
            raise ConfigError("the feature pass got no batches")
        return self.gather({k: torch.cat(v) for k, v in parts.items()})

    def feature_subset(self, index: Tensor, fraction: float) -> Tensor:
        """``index`` itself, or for ``fraction < 1`` a random subset of that size (at least one
        sample, in the original order), drawn from ``(seed, epoch)`` so that a resumed run draws
        the same."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if fraction == 1.0:
            return index
        gen = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        keep = max(1, round(fraction * len(index)))
        return index[torch.randperm(len(index), generator=gen)[:keep]].sort().values

    def features(
        self, index: Tensor, load: Callable[[Tensor], Iterable[Batch]], fraction: float = 1.0
    ) -> SplitFeatures:
        """The feature pass of the epoch hooks (:class:`~mmbalance.methods.base.EpochContext`)
        over the samples ``index`` of a split (a random ``fraction`` of them), whose batches
        ``load(index)`` yields."""
        return self.split_features(self.outputs(load(self.feature_subset(index, fraction)), True))

    def split_features(
        self, out: Mapping[str, Tensor], rows: Tensor | None = None
    ) -> SplitFeatures:
        """The :class:`SplitFeatures` of a pass's :meth:`outputs` (with latents), or of its
        ``rows``."""
        model: Any = self.model
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        return SplitFeatures(
            latents={m: pick(out[f"latent_{m}"]) for m in model.modalities},
            logits=pick(out["logits"]),
            unimodal_logits={m: pick(out[f"unimodal_{m}"]) for m in model.unimodal_heads},
            targets=pick(out["targets"]),
            index=pick(out["index"]),
        )


__all__ = ["BeforeStep", "EpochStart", "StepModule", "TrainingProtocol", "loss_values"]
