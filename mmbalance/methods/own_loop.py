"""Any method in your own training loop, on your own model: :class:`MethodAdapter`.

A method needs more than a model's outputs. OGM-GE re-evaluates the fusion head on altered
latents, MCR evaluates it with stop-gradients and owns a trainable head (``lam_ceb > 0``),
MMPareto and OGM rewrite the encoders' gradients, OPM transforms the latents before the heads,
and methods with epoch hooks read the model and the data between epochs. Our trainer provides all
of that; :class:`MethodAdapter` provides it for a model you wrote, from one call::

    method = build_method("mcr", {"lam_ceb": 0.1})
    adapter = MethodAdapter(
        method,
        model,                                   # your nn.Module
        encoders={"audio": model.audio, "video": model.video},
        fusion=lambda z: model.classifier(torch.cat([z["audio"], z["video"]], 1)),
        unimodal_heads={"audio": model.audio_head, "video": model.video_head},
        num_outputs=3,
        latent_dims={"audio": 16, "video": 16},
    )
    # your model's parameters and the method's own module (MCR's CEB head), once each
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-3)
    for epoch in range(epochs):
        adapter.begin_epoch(epoch, optimizer)            # epoch hooks, phases, lr scales
        for inputs, targets in loader:                   # inputs: {modality: tensor}
            ctx = adapter.context(targets, inputs, epoch)   # one StepContext per step
            optimizer.zero_grad()
            output = adapter.forward(inputs, ctx)        # encode, method's latent transform, heads
            losses = method.losses(output, ctx)          # named loss terms
            method.backward(losses, ctx)                 # default: backward of their sum
            method.rewrite_gradients(ctx)                # e.g. OGM's coefficient
            optimizer.step()
        adapter.end_epoch(epoch, val_metrics={"accuracy": ...})
    prediction = adapter.predict(test_inputs)            # what the method predicts

or, for the whole step protocol in one call (methods that split a step into parts included),
``adapter.train_step(inputs, targets, optimizer, epoch)``.

What the adapter builds from your parts:

- the :class:`~mmbalance.methods.base.ModelInfo` and ``method.setup(info)``; the module setup
  returns (MCR's CEB head; ``None`` for most methods) is :attr:`MethodAdapter.method_module`, and
  :meth:`MethodAdapter.parameters` includes it, so the optimizer trains it;
- the fusion function with the stop-gradient interface that methods call,
  ``fusion(latents, stop_grad) -> FusionOutput``. A fusion head of ours
  (:class:`~mmbalance.models.FusionHead`) is used as it is. Any other callable that maps the
  latents (a dict by modality) to logits is wrapped: the latents of the modalities in
  ``stop_grad`` are detached before it runs, so they get no gradient from that evaluation, while
  the fusion's own weights still do (the rule of our non-additive heads). Methods that read
  additive contributions (OGM's score, MCR's cheap permutation) fall back to their general
  rules for such a function;
- the encoders as ``encode(inputs) -> latents`` (MCR's input perturbations), each encoder's
  trainable parameters (OGM's and MMPareto's gradient rewriting), the unimodal heads' logits in
  the :class:`~mmbalance.models.ModelOutput`;
- named parameter groups as the trainer names them (``encoder.<m>``, ``unimodal_head.<m>``,
  ``fusion``, ``method``: :meth:`MethodAdapter.param_groups`), so that a method's phases and
  learning-rate scales apply to an optimizer built from them;
- :class:`~mmbalance.methods.base.EpochContext` objects for the epoch hooks, with a no-grad
  feature pass over the data you give (``splits``).

What stays yours: the data, the schedule, evaluation, checkpoints (save ``method.state_dict()``
and ``adapter.method_module`` with your model), and unimodal pre-training for the methods that
declare ``needs_unimodal_pretraining`` (pre-train your encoders with their unimodal heads first).
Single process only: ``backward`` is ``loss.backward()`` and ``all_reduce`` the identity.

Two methods need a little more of your loop:

- a method that re-samples the epoch (``remix``) returns subsets from
  ``method.epoch_subsets(ctx)`` (``ctx`` is what :meth:`MethodAdapter.begin_epoch` returned):
  train on each subset's samples in turn (indices into the order of your ``splits["train"]``
  batches), giving each step its subset's name, ``adapter.context(..., subset=name)`` or
  ``adapter.train_step(..., subset=name)``;
- a method whose module grows (``aug``) adds parameters at an epoch's end:
  :meth:`MethodAdapter.begin_epoch` gives them to the optimizer you pass it, and before you
  load a saved optimizer state call ``method.restore_module_layout(layout)`` with the
  ``method.module_layout()`` you saved, then :meth:`MethodAdapter.adopt_new_parameters`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, DataError
from mmbalance.methods.base import (
    TRAINING_SPLITS,
    EpochContext,
    Method,
    ModelInfo,
    Phase,
    SplitFeatures,
    StepContext,
    Task,
    build_method,
)
from mmbalance.models.fusion import FUSION_HEADS, FusionHead
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import FusionOutput, ModelOutput

#: Batches of one split for the epoch hooks' feature pass: ``(inputs, targets)`` pairs, in a
#: fixed order, iterable more than once (a list, or a DataLoader without shuffling).
SplitBatches = Iterable[tuple[Mapping[str, Tensor], Tensor]]


class FunctionFusion(nn.Module):
    """A fusion function ``latents -> logits`` with the fusion heads' stop-gradient interface.

    ``self(latents, stop_grad)`` detaches the latents of the modalities in ``stop_grad``, then
    calls the function on all of them; forward values never depend on ``stop_grad``. The
    function may also return a :class:`FusionOutput`. A function that is an ``nn.Module`` is
    registered as a submodule (its parameters are this module's).
    """

    additive = False

    def __init__(self, fn: Callable[[dict[str, Tensor]], Tensor | FusionOutput]) -> None:
        super().__init__()
        self.fn = fn

    def forward(
        self, latents: Mapping[str, Tensor], stop_grad: Collection[str] = ()
    ) -> FusionOutput:
        unknown = set(stop_grad) - set(latents)
        if unknown:
            raise ConfigError(f"stop_grad names unknown modalities {sorted(unknown)}")
        inputs = {m: (z.detach() if m in stop_grad else z) for m, z in latents.items()}
        out = self.fn(inputs)
        if isinstance(out, FusionOutput):
            return out
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ConfigError(
                "the fusion function must return logits of shape (batch, outputs) or a "
                f"FusionOutput, got {type(out).__name__}"
                + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
            )
        return FusionOutput(out, None)


class OwnModel(nn.Module):
    """Your encoders, fusion and unimodal heads seen as our model is seen by the methods.

    It holds references to your modules (no copies), so training it trains them. Methods and
    epoch hooks see the same interface as :class:`~mmbalance.models.MultimodalModel`:
    ``modalities``, ``encoders``, ``fusion``, ``unimodal_heads``, ``encode``, ``heads``,
    ``forward`` and ``encoder_parameters``.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: FusionHead | FunctionFusion,
        unimodal_heads: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.unimodal_heads = nn.ModuleDict(dict(unimodal_heads or {}))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    def encode(
        self, inputs: Mapping[str, Tensor], only: Collection[str] | None = None
    ) -> dict[str, Tensor]:
        """Every encoder (or those of ``only``) on its modality's input."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise DataError(f"the inputs lack the modalities {missing}; they have {sorted(inputs)}")
        chosen = self.modalities if only is None else [m for m in self.modalities if m in only]
        return {m: self.encoders[m](inputs[m]) for m in chosen}

    def heads(self, latents: Mapping[str, Tensor], stop_grad: Collection[str] = ()) -> ModelOutput:
        """Fusion and unimodal heads on given latents."""
        fused = self.fusion(latents, stop_grad)
        unimodal = {m: head(latents[m]) for m, head in self.unimodal_heads.items()}
        return ModelOutput(fused.logits, dict(latents), unimodal, fused.contributions)

    def forward(self, inputs: Mapping[str, Tensor]) -> ModelOutput:
        return self.heads(self.encode(inputs))

    def encoder_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters of each encoder, by modality."""
        return {
            m: [p for p in enc.parameters() if p.requires_grad] for m, enc in self.encoders.items()
        }


@dataclass
class StepResult:
    """What :meth:`MethodAdapter.train_step` did: the loss terms (summed over the step's parts)
    and the scalars the method logged (coefficients, drop rates, ...)."""

    losses: dict[str, float]
    logs: dict[str, float]


def _unique(params: Iterable[nn.Parameter], seen: set[int]) -> list[nn.Parameter]:
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class MethodAdapter:
    """A balancing method set up on your own model (see the module docstring for the loop).

    Args:
        method: a :class:`~mmbalance.methods.Method`, or a registered method's name (its
            options then come from ``options``).
        model: your ``nn.Module``; all its trainable parameters train (methods and epoch hooks
            see your parts through :attr:`model`). A :class:`~mmbalance.models.MultimodalModel`
            needs nothing else: its encoders, fusion head and unimodal heads are used.
        encoders: one module per modality, mapping that modality's input to a ``(B, d)``
            latent. The modalities' order is this mapping's.
        fusion: a fusion head of ours, or a callable mapping the latents (a dict by modality)
            to ``(B, num_outputs)`` logits.
        unimodal_heads: one module per modality mapping its latent to logits (required by the
            methods with ``needs_unimodal_heads``: mcr, mmpareto, multiloss, ensemble, ...).
        num_outputs: classes (1 for regression); default: the fusion head's.
        latent_dims: each encoder's latent size; default: the fusion head's, else each
            encoder's ``out_dim`` attribute.
        task: ``classification`` or ``regression``.
        regression_loss: ``l1`` or ``mse`` (regression only).
        options: the method's options when ``method`` is a name.
        splits: data for the epoch hooks' feature pass, by split (``train``, ``val``,
            ``held_out``), each an iterable of ``(inputs, targets)`` batches in a fixed order.
    """

    def __init__(
        self,
        method: Method | str,
        model: nn.Module,
        *,
        encoders: Mapping[str, nn.Module] | None = None,
        fusion: FusionHead | Callable[[dict[str, Tensor]], Tensor] | None = None,
        unimodal_heads: Mapping[str, nn.Module] | None = None,
        num_outputs: int | None = None,
        latent_dims: Mapping[str, int] | None = None,
        task: Task = "classification",
        regression_loss: Literal["l1", "mse"] = "l1",
        options: Mapping[str, Any] | None = None,
        splits: Mapping[str, SplitBatches] | None = None,
    ) -> None:
        if isinstance(method, str):
            method = build_method(method, options or {})
        elif options:
            raise ConfigError("options= applies to a method given by name only")
        if task not in ("classification", "regression"):
            raise ConfigError(f"task must be classification or regression, got {task!r}")
        parts = (encoders, fusion, unimodal_heads)
        ours = isinstance(model, MultimodalModel) and all(p is None for p in parts)
        if isinstance(model, MultimodalModel):
            encoders = dict(model.encoders) if encoders is None else encoders
            fusion = model.fusion if fusion is None else fusion
            if unimodal_heads is None and len(model.unimodal_heads):
                unimodal_heads = dict(model.unimodal_heads)
        if not encoders or fusion is None:
            raise ConfigError(
                "MethodAdapter needs encoders={modality: module} and fusion= (a fusion head or "
                "a function of the latents) for a model other than MultimodalModel"
            )
        if len(encoders) < 2:
            raise ConfigError(
                f"a multimodal model needs at least 2 modalities, got {list(encoders)}"
            )
        modalities = tuple(encoders)
        if unimodal_heads is not None and set(unimodal_heads) != set(modalities):
            raise ConfigError(
                f"unimodal_heads name {sorted(unimodal_heads)}; the encoders {sorted(modalities)}"
            )
        if method.needs_unimodal_heads and not unimodal_heads:
            raise ConfigError(
                f"method {method.name!r} needs a unimodal head per modality: pass "
                "unimodal_heads={modality: module mapping its latent to logits}"
            )
        if method.fusion is not None and not isinstance(fusion, FUSION_HEADS.get(method.fusion)):
            raise ConfigError(
                f"method {method.name!r} is defined on the fusion head {method.fusion!r}: pass "
                f"fusion=build_fusion({method.fusion!r}, latent_dims, num_outputs, {{}})"
            )
        if method.needs_unimodal_pretraining:
            warnings.warn(
                f"method {method.name!r} starts from unimodally pre-trained encoders; the "
                "adapter does not pre-train them: train each encoder with its unimodal head "
                "first",
                stacklevel=2,
            )
        if isinstance(fusion, FusionHead) and set(fusion.modalities) != set(modalities):
            raise ConfigError(
                f"the fusion head's modalities {list(fusion.modalities)} are not the "
                f"encoders' {list(modalities)}"
            )
        head = fusion if isinstance(fusion, FusionHead) else FunctionFusion(fusion)
        self.method = method
        self.user_model = model
        #: your parts, with the interface methods expect of a model (our model as it is)
        self.model: MultimodalModel | OwnModel = (
            model if ours else OwnModel(encoders, head, unimodal_heads)  # type: ignore[assignment]
        )
        self.task: Task = task
        self.regression_loss = regression_loss
        self.splits = dict(splits or {})
        self.info = ModelInfo(
            modalities=modalities,
            latent_dims=self._latent_dims(latent_dims, head, encoders),
            num_outputs=self._num_outputs(num_outputs, head),
            task=task,
            additive_fusion=bool(getattr(head, "additive", False)),
        )
        #: the module the method's ``setup`` returned (trainable; None for most methods)
        self.method_module: nn.Module | None = method.setup(self.info)
        self.encoder_params = self.model.encoder_parameters()
        self.groups = self._groups()
        self.step = 0
        self.phase: Phase | None = None
        #: one row per ended epoch, as the trainer's metrics.csv names them (``val_<metric>``)
        self.history: list[dict[str, float]] = []
        self._started = False

    # --- set-up --------------------------------------------------------------------------------
    @staticmethod
    def _latent_dims(
        given: Mapping[str, int] | None, head: nn.Module, encoders: Mapping[str, nn.Module]
    ) -> dict[str, int]:
        if given is not None:
            if set(given) != set(encoders):
                raise ConfigError(
                    f"latent_dims name {sorted(given)}; the encoders {sorted(encoders)}"
                )
            return {m: int(given[m]) for m in encoders}
        if isinstance(head, FusionHead):
            return {m: int(head.latent_dims[m]) for m in encoders}
        dims = {m: getattr(enc, "out_dim", None) for m, enc in encoders.items()}
        unknown = [m for m, d in dims.items() if not isinstance(d, int)]
        if unknown:
            raise ConfigError(
                f"the latent size of the encoders {unknown} is unknown: pass "
                "latent_dims={modality: size} (or give each encoder an int out_dim attribute)"
            )
        return {m: int(d) for m, d in dims.items()}  # type: ignore[arg-type]

    @staticmethod
    def _num_outputs(given: int | None, head: nn.Module) -> int:
        if given is not None:
            return int(given)
        if isinstance(head, FusionHead):
            return head.num_outputs
        raise ConfigError("pass num_outputs= (classes; 1 for regression)")

    def _groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainer's named parameter groups over your parameters, each parameter once:
        encoders, unimodal heads, then everything else of your model and the fusion (``fusion``),
        then the method's module. Parameters frozen now stay out, as in the trainer."""
        seen: set[int] = set()
        groups: dict[str, list[nn.Parameter]] = {}
        for m in self.info.modalities:
            groups[f"encoder.{m}"] = _unique(self.encoder_params[m], seen)
        for m, head in self.model.unimodal_heads.items():
            groups[f"unimodal_head.{m}"] = _unique(head.parameters(), seen)
        rest = [*self.user_model.parameters(), *self.model.fusion.parameters()]
        groups["fusion"] = _unique((p for p in rest if p.requires_grad), seen)
        module = self.method_module
        groups["method"] = _unique(module.parameters() if module is not None else (), seen)
        return groups

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter: your model's, the parts you passed, the method's module."""
        return [p for group in self.groups.values() for p in group]

    def param_groups(self, **settings: Any) -> list[dict[str, Any]]:
        """The parameters as named optimizer groups (``torch.optim.SGD(adapter.param_groups(),
        lr=...)``), so :meth:`begin_epoch` can apply the method's phases and learning-rate
        scales; ``settings`` (``lr``, ``weight_decay``, ...) go into every group."""
        return [
            {"params": params, "name": name, **settings}
            for name, params in self.groups.items()
            if params
        ]

    # --- steps ---------------------------------------------------------------------------------
    def context(
        self,
        targets: Tensor,
        inputs: Mapping[str, Tensor] | None = None,
        epoch: int = 0,
        **fields: Any,
    ) -> StepContext:
        """The :class:`StepContext` of one training step (each call counts one step); ``fields``
        sets any further field (``index``, ...)."""
        ctx = StepContext.standalone(
            targets,
            task=self.task,
            fusion=self.model.fusion,
            encode=self.model.encode,
            inputs=inputs,
            encoder_params=self.encoder_params,
            epoch=epoch,
            step=self.step,
            regression_loss=self.regression_loss,
            **fields,
        )
        self.step += 1
        return ctx

    def forward(self, inputs: Mapping[str, Tensor], ctx: StepContext) -> ModelOutput:
        """The training forward pass as the trainer runs it: the method's ``encode`` and
        ``transform_latents``, then the fusion and unimodal heads."""
        latents = self.method.encode(self.model, inputs, ctx)
        latents = self.method.transform_latents(latents, ctx)
        return self.model.heads(latents)

    def train_step(
        self,
        inputs: Mapping[str, Tensor],
        targets: Tensor,
        optimizer: torch.optim.Optimizer,
        epoch: int = 0,
        subset: str | None = None,
    ) -> StepResult:
        """One whole training step: for each part of the method's step, zero the gradients,
        forward, losses, the method's backward and gradient rewriting, then ``optimizer.step``
        (``subset``: the epoch subset the batch comes from, for methods that re-sample the
        epoch)."""
        ctx = self.context(targets, inputs, epoch, subset=subset)
        totals: dict[str, float] = {}
        for part in self.method.step_parts(ctx):
            ctx.part = part
            optimizer.zero_grad(set_to_none=True)
            losses = self.method.losses(self.forward(inputs, ctx), ctx)
            self.method.backward(losses, ctx)
            self.method.rewrite_gradients(ctx)
            optimizer.step()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        return StepResult(totals, {k: float(v) for k, v in ctx.logs.items()})

    @torch.no_grad()
    def predict(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """What the method predicts for ``inputs`` (eval mode, restored afterwards)."""
        return self.method.predict(self._eval_output(inputs))

    def _eval_output(self, inputs: Mapping[str, Tensor]) -> ModelOutput:
        modules = [self.user_model, self.model, self.method_module]
        modes = [m.training if m is not None else False for m in modules]
        for m in modules:
            if m is not None:
                m.eval()
        try:
            return self.model(inputs)
        finally:
            for m, mode in zip(modules, modes, strict=True):
                if m is not None:
                    m.train(mode)

    # --- epochs --------------------------------------------------------------------------------
    def epoch_context(
        self, epoch: int, val_metrics: Mapping[str, float] | None = None
    ) -> EpochContext:
        """The :class:`EpochContext` of ``epoch``: the model, a feature pass over ``splits``,
        the encoders' parameters and the validation metrics you give."""
        return EpochContext.standalone(
            epoch,
            model=self.model,
            features=self.features,
            val_metrics=dict(val_metrics or {}),
            history=list(self.history),
            encoder_params=self.encoder_params,
        )

    def begin_epoch(
        self, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> EpochContext:
        """Before ``epoch``'s steps: ``on_train_start`` at the first call, the method's phase
        (which groups train; a fresh optimizer state at a stage that asks for one), its
        learning-rate scales on the optimizer's named groups, then ``on_epoch_start``.

        Learning-rate scales and phases act on an optimizer built from :meth:`param_groups`;
        a scale multiplies the group's learning rate as you (or your scheduler) last set it.
        """
        if not self._started:
            self._started = True
            self.method.on_train_start(self.epoch_context(epoch))
        self._enter_phase(epoch, optimizer)
        ctx = self.epoch_context(epoch)
        self.method.on_epoch_start(ctx)
        if optimizer is not None:
            self.adopt_new_parameters(optimizer)
            self._set_lr(optimizer)
        return ctx

    def adopt_new_parameters(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """Give ``optimizer`` the parameters the method's module gained since it was set up or
        last adopted (methods that ``grows_module``): they join its group named ``method``, or a
        new group of that name. Returns them (none for most methods)."""
        module = self.method_module
        if module is None:
            return []
        known = {id(p) for params in self.groups.values() for p in params}
        new = [p for p in module.parameters() if id(p) not in known]
        if not new:
            return []
        self.groups["method"].extend(new)
        group = next((g for g in optimizer.param_groups if g.get("name") == "method"), None)
        if group is None:
            optimizer.add_param_group({"params": new, "name": "method"})
        else:
            group["params"].extend(new)
        return new

    def end_epoch(self, epoch: int, val_metrics: Mapping[str, float] | None = None) -> EpochContext:
        """After ``epoch``'s validation: ``on_epoch_end`` with its metrics (keys as the
        trainer's ``metrics.csv`` without ``val_``: ``accuracy``, ``loss``, ...)."""
        ctx = self.epoch_context(epoch, val_metrics)
        self.method.on_epoch_end(ctx)
        row = {"epoch": float(epoch), **{f"val_{k}": v for k, v in (val_metrics or {}).items()}}
        self.history.append(row | {f"method_{k}": v for k, v in ctx.logs.items()})
        return ctx

    def _enter_phase(self, epoch: int, optimizer: torch.optim.Optimizer | None) -> None:
        phase = self.method.phase(epoch)
        changed = self.phase is not None and phase.name != self.phase.name
        if changed and phase.reset_optimizer and optimizer is not None:
            optimizer.state.clear()  # the state of a fresh optimizer: no moments, no momentum
        self.phase = phase
        for name, params in self.groups.items():
            trainable = phase.trainable is None or name in phase.trainable
            for p in params:
                p.requires_grad_(trainable)

    def _set_lr(self, optimizer: torch.optim.Optimizer) -> None:
        scales = dict(self.method.lr_scales())
        unknown = set(scales) - set(self.groups)
        if unknown:
            raise ConfigError(
                f"method {self.method.name!r} scales unknown parameter groups {sorted(unknown)}"
            )
        trainable = self.phase.trainable if self.phase is not None else None
        for group in optimizer.param_groups:
            name = group.get("name")
            if name not in self.groups:
                continue
            # the rate as last set from outside: ours if nobody changed it since
            ours = group.get("mmbalance_lr")
            base = group["mmbalance_base_lr"] if ours == group["lr"] else group["lr"]
            active = trainable is None or name in trainable
            group["lr"] = base * scales.get(name, 1.0) if active else 0.0
            group["mmbalance_base_lr"], group["mmbalance_lr"] = base, group["lr"]

    @torch.no_grad()
    def features(self, split: str, fraction: float = 1.0) -> SplitFeatures:
        """A no-grad, eval-mode pass over ``splits[split]`` (see :class:`EpochContext`);
        ``fraction < 1`` keeps a random subset drawn from the step count."""
        if split not in TRAINING_SPLITS:
            raise ValueError(f"a method may read the splits {TRAINING_SPLITS}, not {split!r}")
        if split not in self.splits:
            raise ConfigError(
                f"the method reads the {split!r} split between epochs: pass "
                f"splits={{{split!r}: batches of (inputs, targets)}} to MethodAdapter"
            )
        parts: dict[str, list[Tensor]] = {}
        for inputs, targets in self.splits[split]:
            output = self._eval_output(inputs)
            pieces = {f"latent_{m}": z for m, z in output.latents.items()}
            pieces |= {f"unimodal_{m}": u for m, u in output.unimodal_logits.items()}
            pieces |= {"logits": output.logits, "targets": targets}
            for k, v in pieces.items():
                parts.setdefault(k, []).append(v)
        if not parts:
            raise ConfigError(f"splits[{split!r}] holds no batches")
        out = {k: torch.cat(v) for k, v in parts.items()}
        index = torch.arange(len(out["targets"]))
        if fraction < 1.0:
            gen = torch.Generator().manual_seed(self.step)
            keep = max(1, round(fraction * len(index)))
            index = torch.randperm(len(index), generator=gen)[:keep].sort().values
        modalities = self.info.modalities
        return SplitFeatures(
            latents={m: out[f"latent_{m}"][index] for m in modalities},
            logits=out["logits"][index],
            unimodal_logits={m: out[f"unimodal_{m}"][index] for m in self.model.unimodal_heads},
            targets=out["targets"][index],
            index=index,
        )


__all__ = [
    "FunctionFusion",
    "MethodAdapter",
    "OwnModel",
    "SplitBatches",
    "StepResult",
]
