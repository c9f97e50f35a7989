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

or, for the whole step in one call (methods that split a step into parts included),
``adapter.train_step(inputs, targets, optimizer, epoch)``. Either way the hooks run in the order
our trainer runs them: both hand the method and the model to one
:class:`~mmbalance.methods.protocol.TrainingProtocol`, and the adapter is only the way to hand it
your modules.

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
  feature pass and the raw batches of the data you give (``splits``).

What stays yours: the data, the schedule, evaluation, checkpoints (save ``method.state_dict()``
and ``adapter.method_module`` with your model), and unimodal pre-training for the methods that
declare ``needs_unimodal_pretraining`` (pre-train your encoders with their unimodal heads first).
Single process only: ``backward`` is ``loss.backward()`` and ``all_reduce`` the identity.

Two methods need a little more of your loop:

- a method that re-samples the epoch (``remix``): after :meth:`MethodAdapter.begin_epoch`,
  :attr:`MethodAdapter.subsets` holds the epoch's subsets (``None``: the usual epoch): train on
  each subset's samples in turn (indices into the order of your ``splits["train"]`` batches),
  giving each step its subset's name, ``adapter.context(..., subset=name)`` or
  ``adapter.train_step(..., subset=name)``;
- a method whose module grows (``aug``) adds parameters at an epoch's end:
  :meth:`MethodAdapter.end_epoch` (and :meth:`MethodAdapter.begin_epoch`) give them to the
  optimizer you pass it, and before you load saved weights and optimizer state call
  :meth:`MethodAdapter.restore_module_layout` with the ``method.module_layout()`` you saved.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.data.base import Batch
from mmbalance.errors import ConfigError, DataError
from mmbalance.methods.base import (
    TRAINING_SPLITS,
    EpochContext,
    EpochSubset,
    Method,
    ModelInfo,
    Phase,
    SplitFeatures,
    StepContext,
    Task,
    build_method,
    parameter_groups,
)
from mmbalance.methods.protocol import TrainingProtocol
from mmbalance.models.fusion import FUSION_HEADS, FusionHead
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import FusionOutput, ModelOutput

#: The data of one split for the epoch hooks: ``(inputs, targets)`` batches, in a fixed order,
#: iterable more than once (a list, or a DataLoader without shuffling).
SplitData = Iterable[tuple[Mapping[str, Tensor], Tensor]]


class FunctionFusion(nn.Module):
    """A fusion function ``latents -> logits`` of ``modalities`` with the fusion heads'
    stop-gradient interface.

    ``self(latents, stop_grad)`` detaches the latents of the modalities in ``stop_grad``, then
    calls the function on all of them; forward values never depend on ``stop_grad``. The
    function may also return a :class:`FusionOutput`. A function that is an ``nn.Module`` is
    registered as a submodule (its parameters are this module's).
    """

    additive = False

    def __init__(
        self,
        fn: Callable[[dict[str, Tensor]], Tensor | FusionOutput],
        modalities: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.fn = fn
        self.modalities = tuple(modalities)

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


@dataclass
class StepResult:
    """What :meth:`MethodAdapter.train_step` did: the loss terms (summed over the step's parts)
    and the scalars the method logged (coefficients, drop rates, ...)."""

    losses: dict[str, float]
    logs: dict[str, float]


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
        initial_encoder_state: the encoders' parameters and buffers before any unimodal
            pre-training (keys of ``encoders[m].state_dict()`` prefixed by ``m.``), which
            ``on_train_start`` receives (UMT restarts its students from them); default: the
            encoders as they are now.
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
        splits: Mapping[str, SplitData] | None = None,
        initial_encoder_state: Mapping[str, Tensor] | None = None,
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
        if isinstance(fusion, FusionHead):
            head: FusionHead | FunctionFusion = fusion
            encoders = {m: encoders[m] for m in fusion.modalities}  # in the head's order
        else:
            head = FunctionFusion(fusion, modalities)
        self.method = method
        self.user_model = model
        #: your parts, seen as our model is seen by the methods (our model as it is)
        self.model: MultimodalModel = (
            model  # type: ignore[assignment]
            if ours
            else MultimodalModel(encoders, head, dict(unimodal_heads or {}))  # type: ignore[arg-type]
        )
        self.task: Task = task
        self.regression_loss = regression_loss
        self.splits = dict(splits or {})
        others = list(model.parameters())
        self.info = ModelInfo(
            modalities=self.model.modalities,
            latent_dims=self._latent_dims(latent_dims, head, encoders),
            num_outputs=self._num_outputs(num_outputs, head),
            task=task,
            additive_fusion=bool(getattr(head, "additive", False)),
            parameter_groups=parameter_groups(self.model, None, others),
        )
        #: the module the method's ``setup`` returned (trainable; None for most methods)
        self.method_module: nn.Module | None = method.setup(self.info)
        #: the order of the method's hooks, on your modules
        self.protocol = TrainingProtocol(
            method,
            self.model,
            self.method_module,
            task=task,
            regression_loss=regression_loss,
            other_parameters=others,
            other_modules=[model],
        )
        #: one row per ended epoch, as the trainer's metrics.csv names them (``val_<metric>``)
        self.history: list[dict[str, float]] = []
        self.initial_encoder_state = dict(
            initial_encoder_state
            if initial_encoder_state is not None
            else {k: v.detach().clone() for k, v in self.model.encoders.state_dict().items()}
        )
        self._started = False
        self._epoch_start: EpochContext | None = None
        #: the subsets of the epoch begun last (``Method.epoch_subsets``, checked), to train one
        #: after the other; ``None``: the usual epoch over the whole training data
        self.subsets: list[EpochSubset] | None = None

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

    @property
    def groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainer's named parameter groups over your parameters, each parameter once:
        encoders, unimodal heads, then everything else of your model and the fusion (``fusion``),
        then the method's module. Parameters frozen when the adapter was built stay out, as in
        the trainer."""
        return self.protocol.groups

    @property
    def encoder_params(self) -> dict[str, list[nn.Parameter]]:
        """Each encoder's trainable parameters, by modality."""
        return self.protocol.encoder_params

    @property
    def step(self) -> int:
        """Steps so far (each :meth:`context` and :meth:`train_step` counts one)."""
        return self.protocol.step

    @property
    def phase(self) -> Phase | None:
        """The method's phase of the last epoch begun."""
        return self.protocol.phase

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter: your model's, the parts you passed, the method's module."""
        return [p for group in self.groups.values() for p in group]

    def param_groups(self, **settings: Any) -> list[dict[str, Any]]:
        """The parameters as named optimizer groups (``torch.optim.SGD(adapter.param_groups(),
        lr=...)``), so :meth:`begin_epoch` can apply the method's phases and learning-rate
        scales; ``settings`` (``lr``, ``weight_decay``, ...) go into every group."""
        return self.protocol.param_groups(**settings)

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
        ctx = self.protocol.context(targets, inputs, epoch, **fields)
        self.protocol.step += 1
        return ctx

    def forward(self, inputs: Mapping[str, Tensor], ctx: StepContext) -> ModelOutput:
        """The training forward pass as the trainer runs it: the method's ``encode`` and
        ``transform_latents``, then the fusion and unimodal heads."""
        return self.protocol.module.output(inputs, ctx)

    def train_step(
        self,
        inputs: Mapping[str, Tensor],
        targets: Tensor,
        optimizer: torch.optim.Optimizer,
        epoch: int = 0,
        **fields: Any,
    ) -> StepResult:
        """One whole training step, as the trainer runs it: for each part of the method's step,
        zero the gradients, forward, losses, the method's backward and gradient rewriting, then
        ``optimizer.step``; ``fields`` sets further fields of the step's context (``index``,
        ``epoch_progress``, ``subset``: the epoch subset the batch comes from, for methods that
        re-sample the epoch)."""
        ctx = self.protocol.context(targets, inputs, epoch, **fields)
        terms = self.protocol.run_step(ctx, optimizer)
        return StepResult(terms, {k: float(v) for k, v in ctx.logs.items()})

    @torch.no_grad()
    def predict(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """What the method predicts for ``inputs`` (eval mode, every module's mode restored)."""
        with self.protocol.evaluating():
            return self.method.predict(self.protocol.eval_output(inputs))

    # --- epochs --------------------------------------------------------------------------------
    def epoch_context(
        self, epoch: int, val_metrics: Mapping[str, float] | None = None
    ) -> EpochContext:
        """The :class:`EpochContext` of ``epoch``: the model, a feature pass and the batches of
        ``splits``, the encoders' parameters and the validation metrics you give."""
        return self.protocol.epoch_context(
            epoch, self.features, self.split_batches, val_metrics, self.history
        )

    def begin_epoch(
        self, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> EpochContext:
        """Before ``epoch``'s steps: ``on_train_start`` at the first call, the method's phase
        (which groups train; a fresh optimizer state at a stage that asks for one),
        ``on_epoch_start``, then its learning-rate scales on the optimizer's named groups.

        Learning-rate scales and phases act on an optimizer built from :meth:`param_groups`;
        a scale multiplies the group's learning rate as you (or your scheduler) last set it.
        """
        if not self._started:
            self._started = True
            start = self.epoch_context(epoch)
            start.initial_encoder_state = self.initial_encoder_state
            self.method.on_train_start(start)
            self.initial_encoder_state = {}  # read once: no copy of the encoders kept
        ctx = self.epoch_context(epoch)
        self.subsets = self.protocol.begin_epoch(ctx, optimizer, _rate_set_outside).subsets
        if optimizer is not None:
            for group in optimizer.param_groups:
                if group.get("name") in self.groups:
                    group["mmbalance_lr"] = group["lr"]
        self._epoch_start = ctx
        return ctx

    def restore_module_layout(
        self, layout: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """For a method whose module grows: rebuild it to the ``method.module_layout()`` you saved
        with its weights, and give what it gained to ``optimizer``; call it before you load the
        saved weights of :attr:`method_module` and the optimizer's saved state."""
        self.protocol.restore_module_layout(layout, optimizer)

    def end_epoch(
        self,
        epoch: int,
        val_metrics: Mapping[str, float] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> EpochContext:
        """After ``epoch``'s validation: ``on_epoch_end`` with its metrics (keys as the
        trainer's ``metrics.csv`` without ``val_``: ``accuracy``, ``loss``, ...); parameters the
        method's module gained join ``optimizer`` (pass it, so that what you save now holds
        them; otherwise the next :meth:`begin_epoch` gives them to it)."""
        ctx = self.epoch_context(epoch, val_metrics)
        start = self._epoch_start if self._epoch_start is not None else ctx
        self.history.append(self.protocol.end_epoch(start, ctx, optimizer))
        self._epoch_start = None
        return ctx

    # --- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs besides the parameters (yours and :attr:`method_module`'s) and the
        optimizer's state: the method's state, the step count, the epoch and phase of the last
        epoch context, the epoch rows, whether training started and whether an epoch is open
        (begun and not ended). Tensors and plain values only."""
        return {
            "method": self.method.state_dict(),
            "step": self.protocol.step,
            "epoch": self.protocol.epoch,
            "phase": None if self.phase is None else self.phase.name,
            "history": [dict(row) for row in self.history],
            "started": self._started,
            "epoch_open": self._epoch_start is not None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so that the next :meth:`begin_epoch` goes on
        as an uninterrupted run would (no second ``on_train_start``; a fresh optimizer state at
        the next stage boundary)."""
        try:
            self.method.load_state_dict(state["method"])
            step, epoch = int(state["step"]), int(state["epoch"])
            history = [dict(row) for row in state["history"]]
            started, phase = bool(state["started"]), state["phase"]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise DataError(
                f"the saved state does not match method {self.method.name!r} ({type(err).__name__})"
            ) from None
        self.protocol.step, self.protocol.epoch, self.history = step, epoch, history
        self.protocol.resume_phase(None if phase is None else str(phase), epoch)
        self._started = started
        if started:
            self.initial_encoder_state = {}
        self._epoch_start = None

    def split_batches(self, split: str) -> Iterator[Batch]:
        """The batches of ``splits[split]`` with their inputs, targets and the samples' positions
        in the split (see :class:`EpochContext`)."""
        if split not in TRAINING_SPLITS:
            raise ValueError(f"a method may read the splits {TRAINING_SPLITS}, not {split!r}")
        if split not in self.splits:
            raise ConfigError(
                f"the method reads the {split!r} split between epochs: pass "
                f"splits={{{split!r}: batches of (inputs, targets)}} to MethodAdapter"
            )
        start = 0
        for inputs, targets in self.splits[split]:
            n = int(targets.shape[0])
            index = torch.arange(start, start + n, device=targets.device)
            yield Batch(dict(inputs), targets, index)
            start += n

    def features(self, split: str, fraction: float = 1.0) -> SplitFeatures:
        """A no-grad, eval-mode pass over ``splits[split]`` (see :class:`EpochContext`);
        ``fraction < 1`` keeps a random subset drawn from the epoch, as the trainer draws it."""
        out = self.protocol.outputs(self.split_batches(split), latents=True)
        rows = self.protocol.feature_subset(torch.arange(len(out["index"])), fraction)
        return self.protocol.split_features(out, rows)


def _rate_set_outside(group: dict[str, Any]) -> float:
    """A named group's learning rate as last set from outside: ours (from the last
    :meth:`MethodAdapter.begin_epoch`, recorded in the group) if nobody changed it since."""
    ours = group.get("mmbalance_lr")
    base = group["mmbalance_base_lr"] if ours == group["lr"] else group["lr"]
    group["mmbalance_base_lr"] = base
    return base


__all__ = [
    "FunctionFusion",
    "MethodAdapter",
    "SplitData",
    "StepResult",
]
