"""The method interface: how a balancing method plugs into one training loop.

A method is one small class. The loop calls, for every training batch and for every part of
the batch's step (:meth:`Method.step_parts`; one part unless the method alternates)::

    latents = method.encode(model, inputs, ctx)             # default: every encoder
    latents = method.transform_latents(latents, ctx)        # (b) forward transformation
    output  = heads(latents)                                # a ModelOutput
    losses  = method.losses(output, ctx)                    # (a) named loss terms
    method.backward(losses, ctx)                            # default: backward of their sum
    method.rewrite_gradients(ctx)                           # (c) e.g. OGM's coefficient
    optimizer.step()

and around the epochs, with an :class:`EpochContext` (the model, a no-grad pass over a split,
the epoch's validation metrics)::

    method.on_train_start(ectx)            # once, before the first epoch of a fresh run
    for epoch in ...:
        phase = method.phase(epoch)        # trainable parameter groups, optimizer resets
        method.on_epoch_start(ectx)
        subsets = method.epoch_subsets(ectx)   # None: the whole training split, shuffled
        lr of group g = train.lr * schedule(epoch) * method.lr_scales()[g]
        ... the epoch's steps (each subset in turn) ...
        validation
        method.on_epoch_end(ectx)          # ectx.val_metrics holds this epoch's validation

plus ``state_dict`` for state across steps, epochs and resumes (d), and class attributes that
declare what the method needs (e). Evaluation uses ``method.predict(output)``. The loop never
branches on a method's name.

Re-sampled epochs. After ``on_epoch_start``, :meth:`Method.epoch_subsets` may return named
subsets of the training split (:class:`EpochSubset`, indices as in
:attr:`SplitFeatures.index`); the epoch then trains on each subset in turn, in batches shuffled
from ``(train.seed, epoch)``, and every step's :attr:`StepContext.subset` names its subset (Data
Remixing's modality-pure batches). The default, ``None``, is the usual epoch over the whole split.

Growing modules. A method whose module (the one :meth:`Method.setup` returned) gains parameters
during training declares ``grows_module`` (AUG adds a classifier at an epoch's end). After every
epoch hook the loop gives the parameters that appeared to the optimizer (they join the ``method``
group, with fresh optimizer state), and every checkpoint of the module's weights also holds
:meth:`Method.module_layout`, which :meth:`Method.restore_module_layout` rebuilds before those
weights are loaded (on resume, for the selected weights at the end of a run, in ``evaluate``).

Epoch hooks read data through the context: :attr:`EpochContext.features` (a no-grad pass that
returns latents and predictions) and :attr:`EpochContext.batches` (the raw batches of a split, for
methods that differentiate through the model on held-out data, like LFM's weight update). At
``on_train_start``, :attr:`EpochContext.initial_encoder_state` holds the encoders as built, before
any unimodal pre-training (UMT keeps the pre-trained encoders as teachers and restarts its
students from these weights).

Evaluation encodes through the method too: the validation and test passes, the epoch feature
passes and the run's end analysis compute ``model.heads(method.encode_eval(model, inputs))``
(default: every encoder on its modality). A method that changes the architecture itself, such as
Greedy's cross-modal blocks between encoder stages (held in the module its :meth:`Method.setup`
returns), overrides :meth:`Method.encode` and :meth:`Method.encode_eval` alike, so that what is
evaluated is what was trained.

Parameter groups. The trainer's optimizer has one parameter group per part of the model, named
``encoder.<m>``, ``unimodal_head.<m>``, ``fusion`` and ``method`` (the module the method's
:meth:`Method.setup` returns). :meth:`Method.lr_scales` scales a group's learning rate (MSLR), and
:meth:`Method.phase` names the groups that train in an epoch (ReconBoost's stages); a group that
does not train gets learning rate 0 and no gradient, whatever the optimizer.

Nothing here depends on our trainer: build a :class:`StepContext` with
:meth:`StepContext.standalone` (and an :class:`EpochContext` with
:meth:`EpochContext.standalone`) and call the hooks from a plain PyTorch loop
(see ``examples/plain_pytorch.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import build_dataclass
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.models.output import FusionOutput, ModelOutput

if TYPE_CHECKING:
    from collections.abc import Iterable

    from mmbalance.data.base import Batch

Task = Literal["classification", "regression"]
FusionFn = Callable[[Mapping[str, Tensor], Collection[str]], FusionOutput]


def _sum_all_reduce(t: Tensor) -> Tensor:
    return t


def _plain_backward(loss: Tensor) -> None:
    loss.backward()


@dataclass
class ModelInfo:
    """What a method may know about the model when it is set up.

    Attributes:
        modalities: the modalities, in the model's order.
        latent_dims: each encoder's latent size.
        num_outputs: classes (1 for regression).
        task: ``classification`` or ``regression``.
        additive_fusion: the fusion head's logits are a sum of per-modality contributions.
        parameter_groups: the model's named parameter groups (``encoder.<m>``,
            ``unimodal_head.<m>``, ``fusion``; see the module docstring), each holding the
            parameters that train when the method is set up, for methods that watch a group's
            gradients (Greedy's learning speeds); empty when the caller has no model at hand.
    """

    modalities: tuple[str, ...]
    latent_dims: dict[str, int]
    num_outputs: int
    task: Task = "classification"
    additive_fusion: bool = False
    parameter_groups: Mapping[str, Sequence[nn.Parameter]] = field(default_factory=dict)


@dataclass
class StepContext:
    """Everything a hook may use during one step, independent of the trainer.

    Attributes:
        targets: labels ``(B,)`` (long) or regression targets ``(B,)`` (float).
        task: ``classification`` or ``regression``.
        fusion: the fusion head as a function ``(latents, stop_grad) -> FusionOutput``, for
            methods that re-evaluate it on perturbed latents.
        encode: the encoders as a function ``inputs -> latents`` (input-space perturbations).
        inputs: the batch's raw inputs.
        encoder_params: trainable parameters of each modality's encoder (gradient rewriting).
        epoch, step: current epoch and global step (0-based).
        backward: how to run backward on a scalar (the engine's, for precision and DDP).
        all_reduce: sums a tensor over processes (identity without DDP).
        world_size: number of processes.
        regression_loss: ``l1`` or ``mse``.
        part: which part of the batch's step this is (an element of
            :meth:`Method.step_parts`; ``None`` for the usual single step).
        index: the batch's samples' indices in the training split's dataset ``(B,)``, for
            per-sample state computed at epoch boundaries (valuation's per-sample Shapley values,
            matched to :attr:`SplitFeatures.index`); ``None`` when the caller has none.
        epoch_progress: the fraction of the epoch's batches before this one, in ``[0, 1)``, for
            schedules within an epoch (MLA's projector regulariser).
        subset: the name of the :class:`EpochSubset` this step's batch comes from, in an epoch
            that :meth:`Method.epoch_subsets` re-sampled; ``None`` in the usual epoch.
        logs: scalars the method records for this step (see :meth:`log`).
        scratch: per-step working state that one hook hands to a later hook of the same step
            (e.g. a modulation coefficient computed in ``losses`` and applied in
            ``rewrite_gradients``). A new context is made for every step, so nothing here
            leaks into the next one; methods keep no per-step state on ``self``.
    """

    targets: Tensor
    task: Task = "classification"
    fusion: FusionFn | None = None
    encode: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    inputs: Mapping[str, Tensor] | None = None
    encoder_params: Mapping[str, Sequence[nn.Parameter]] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    backward: Callable[[Tensor], None] = _plain_backward
    all_reduce: Callable[[Tensor], Tensor] = _sum_all_reduce
    world_size: int = 1
    regression_loss: Literal["l1", "mse"] = "l1"
    part: str | None = None
    index: Tensor | None = None
    epoch_progress: float = 0.0
    subset: str | None = None
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def standalone(cls, targets: Tensor, **kwargs: Any) -> StepContext:
        """A context for a user's own loop (single process, plain ``loss.backward()``)."""
        return cls(targets=targets, **kwargs)

    def task_loss(self, logits: Tensor) -> Tensor:
        """Cross-entropy for classification; L1 or MSE on ``logits[:, 0]`` for regression."""
        return task_loss(logits, self.targets, self.task, self.regression_loss)

    def log(self, name: str, value: Tensor | float) -> None:
        """Record a per-step scalar (coefficients, ratios, ...); the trainer saves it.

        Tensors are kept (detached) and read only after the optimizer step, so logging never
        forces a host-device synchronisation in the middle of a step.
        """
        self.logs[name] = value.detach() if isinstance(value, Tensor) else float(value)


@dataclass
class SplitFeatures:
    """One no-grad pass of the current model over (part of) a split, in dataset order.

    Attributes:
        latents: pooled latents by modality ``(N, d_m)``.
        logits: fused predictions ``(N, num_outputs)``.
        unimodal_logits: the unimodal heads' predictions by modality (models with heads).
        targets: labels or regression targets ``(N,)``.
        index: the samples' indices in the split's dataset ``(N,)``.
    """

    latents: dict[str, Tensor]
    logits: Tensor
    unimodal_logits: dict[str, Tensor]
    targets: Tensor
    index: Tensor


FeaturePass = Callable[[str, float], SplitFeatures]
SplitBatches = Callable[[str], "Iterable[Batch]"]

#: Splits a method may read during training. The test split is never among them: methods that
#: need held-out data (D&R's diagnosis, G-Blending's weights) use ``val`` or ``held_out``.
TRAINING_SPLITS = ("train", "val", "held_out")


def _no_feature_pass(split: str, fraction: float = 1.0) -> SplitFeatures:
    raise RuntimeError("this EpochContext has no feature pass (pass features=... to standalone)")


def _no_batches(split: str) -> Iterable[Batch]:
    raise RuntimeError("this EpochContext has no split batches (pass batches=... to standalone)")


@dataclass
class EpochContext:
    """What the epoch-level hooks may use, independent of the trainer.

    Attributes:
        epoch: the epoch (0-based) that starts or ends.
        model: the multimodal model itself (for snapshots of initial weights, in-place
            re-initialisation, reading encoders); a :class:`~mmbalance.models.MultimodalModel` in
            our trainer.
        features: ``features(split, fraction=1.0)`` runs the model without gradients, in eval
            mode, over ``split`` (one of :data:`TRAINING_SPLITS`) and returns
            :class:`SplitFeatures`. ``fraction < 1`` takes a random subset of that size, drawn
            from ``(train.seed, epoch)`` so that a resumed run sees the same subset. Under DDP
            every rank gets the whole gathered result.
        batches: ``batches(split)`` yields the batches of ``split`` (one of
            :data:`TRAINING_SPLITS`) with their raw inputs, on the model's device, every sample
            once in dataset order; every rank gets the whole split. For methods that need
            gradients through the model on data it does not train on (LFM's weight update on the
            ``held_out`` split); the model's mode is the caller's to set.
        initial_encoder_state: at ``on_train_start`` only, the encoders' parameters and buffers
            as the model was built, before any unimodal pre-training (keys of
            ``model.encoders.state_dict()``); empty at every other hook.
        val_metrics: this epoch's validation metrics (``on_epoch_end`` only; empty otherwise),
            with the keys of ``metrics.csv`` without their ``val_`` prefix (``accuracy``,
            ``loss``, ``unimodal_accuracy_<m>`` for models with heads, ...).
        history: the rows of ``metrics.csv`` of the epochs before this one.
        encoder_params: trainable parameters of each modality's encoder.
        all_reduce: sums a tensor over processes (identity without DDP).
        world_size: number of processes.
        logs: epoch scalars the method records (see :meth:`log`); they join the epoch's row of
            ``metrics.csv`` as ``method_<name>``.
    """

    epoch: int
    model: nn.Module | None = None
    features: FeaturePass = _no_feature_pass
    batches: SplitBatches = _no_batches
    initial_encoder_state: Mapping[str, Tensor] = field(default_factory=dict)
    val_metrics: Mapping[str, float] = field(default_factory=dict)
    history: Sequence[Mapping[str, float]] = ()
    encoder_params: Mapping[str, Sequence[nn.Parameter]] = field(default_factory=dict)
    all_reduce: Callable[[Tensor], Tensor] = _sum_all_reduce
    world_size: int = 1
    logs: dict[str, float] = field(default_factory=dict)

    @classmethod
    def standalone(cls, epoch: int, **kwargs: Any) -> EpochContext:
        """A context for a user's own loop (single process)."""
        return cls(epoch=epoch, **kwargs)

    def log(self, name: str, value: Tensor | float) -> None:
        """Record an epoch scalar (a coefficient, a learning-rate factor, a purity...)."""
        self.logs[name] = float(value)


@dataclass(frozen=True)
class EpochSubset:
    """One part of a re-sampled epoch (see :meth:`Method.epoch_subsets`).

    Attributes:
        name: what :attr:`StepContext.subset` says during the steps on this subset.
        index: the subset's samples, as indices into the training split's dataset (the values of
            :attr:`SplitFeatures.index` of a ``features("train")`` pass), 1-D and integer.
    """

    name: str
    index: Tensor


@dataclass(frozen=True)
class Phase:
    """What trains during an epoch, for methods that train in stages.

    Attributes:
        name: the phase's name; a change of name between two epochs is a stage boundary.
        trainable: names of the parameter groups that train (see the module docstring), or
            ``None`` for all of them. The others get learning rate 0 and no gradient.
        reset_optimizer: re-create the optimizer (fresh momentum and adaptive statistics) when
            this phase begins, as methods with per-stage optimizers do.
    """

    name: str = "main"
    trainable: frozenset[str] | None = None
    reset_optimizer: bool = False


def parameter_group_names(modalities: Sequence[str], unimodal_heads: bool) -> list[str]:
    """The names of the trainer's parameter groups for a model with ``modalities``."""
    names = [f"encoder.{m}" for m in modalities]
    if unimodal_heads:
        names += [f"unimodal_head.{m}" for m in modalities]
    return [*names, "fusion", "method"]


def parameter_groups(
    model: nn.Module,
    method_module: nn.Module | None = None,
    others: Iterable[nn.Parameter] = (),
) -> dict[str, list[nn.Parameter]]:
    """The named parameter groups (see the module docstring) of ``model``, a
    :class:`~mmbalance.models.MultimodalModel` or anything with its ``modalities``, ``encoders``,
    ``unimodal_heads`` and ``fusion``, and of the method's module.

    Each group holds the parameters that train now (``requires_grad``), each parameter once,
    in the order of :func:`parameter_group_names`; ``others`` (the parameters of a user's model
    outside its encoders and heads) join ``fusion``.
    """
    seen: set[int] = set()

    def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        out = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    groups = {f"encoder.{m}": trainable(model.encoders[m].parameters()) for m in model.modalities}
    for m, head in model.unimodal_heads.items():
        groups[f"unimodal_head.{m}"] = trainable(head.parameters())
    groups["fusion"] = trainable([*model.fusion.parameters(), *others])
    groups["method"] = trainable(method_module.parameters() if method_module is not None else ())
    return groups


def task_loss(logits: Tensor, targets: Tensor, task: Task, regression_loss: str = "l1") -> Tensor:
    """The supervised loss of one prediction head."""
    if task == "classification":
        return F.cross_entropy(logits, targets)
    pred = logits[:, 0]
    if regression_loss == "mse":
        return F.mse_loss(pred, targets.to(pred.dtype))
    return F.l1_loss(pred, targets.to(pred.dtype))


@dataclass
class NoParams:
    """A method without options."""


#: The search of a method without a ``search_space``: ``train.lr`` candidates are multiples of
#: the configured learning rate.
LR_SEARCH_SPACE: tuple[str, tuple[float, ...]] = ("train.lr", (0.5, 1.0, 2.0))


class Method:
    """Base class: plain joint training (one task loss on the fused output).

    Subclasses override only the hooks they need and declare:

    - ``name``: registry name;
    - ``Params``: a dataclass of options (validated, with range checks in ``__post_init__``);
    - ``needs_unimodal_heads``: the model must have one linear head per modality;
    - ``needs_unimodal_pretraining``: encoders start from unimodal pre-training;
    - ``freezes_encoders``: after pre-training, encoders are frozen (eval mode, no gradient);
    - ``fusion``: the fusion head the method is defined on (e.g. a cosine or shared head), used
      when the user names none; ``None`` for any head;
    - ``tasks``: the tasks the method is defined for (:meth:`setup` refuses another), e.g.
      ``("classification",)`` for methods whose scores are softmax probabilities;
    - ``max_modalities``: the most modalities the method is defined for (``None``: any number;
      :meth:`setup` refuses more);
    - ``scales_gradients``: the method acts by scaling whole gradients or learning rates, which
      adaptive optimizers (Adam, AdamW) largely undo, so the trainer warns when it runs under one;
    - ``search_space``: the main option and three candidate values that an equal-budget
      hyperparameter search tries (``("method.alpha", (0.1, 0.4, 0.8))``); ``None`` searches the
      learning rate at 0.5x, 1x and 2x the configured one;
    - ``missing_modality``: in words, how the method predicts without a modality
      (:meth:`predict_missing`), stated in reports next to its robustness;
    - ``grows_module``: the module :meth:`setup` returns gains parameters during training (see
      :meth:`module_layout`); such a method runs in one process (DDP fixes the parameters when
      it wraps the model).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    needs_unimodal_heads: ClassVar[bool] = False
    needs_unimodal_pretraining: ClassVar[bool] = False
    freezes_encoders: ClassVar[bool] = False
    fusion: ClassVar[str | None] = None
    tasks: ClassVar[tuple[Task, ...]] = ("classification", "regression")
    max_modalities: ClassVar[int | None] = None
    scales_gradients: ClassVar[bool] = False
    search_space: ClassVar[tuple[str, tuple[float, ...]] | None] = None
    missing_modality: ClassVar[str] = "its latent set to zero before the heads"
    grows_module: ClassVar[bool] = False

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        if params is None:
            params = build_dataclass(self.Params, kwargs, f"method.{self.name or 'params'}")
        elif kwargs:
            raise TypeError("pass either a Params instance or keyword options, not both")
        self.params = params
        self.info: ModelInfo | None = None

    # --- set-up --------------------------------------------------------------------------------
    @classmethod
    def variants(cls, name: str, modalities: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """The configurations a comparison runs for this method: ``(label, options)`` pairs."""
        return [(name, {})]

    @classmethod
    def searched_option(cls) -> tuple[str, tuple[float, ...]]:
        """What an equal-budget search tries: :attr:`search_space`, or without one the learning
        rate at 0.5x, 1x and 2x the configured one (:data:`LR_SEARCH_SPACE`)."""
        return cls.search_space or LR_SEARCH_SPACE

    @classmethod
    def refuse_idle_schedule(cls, when: str, epochs: int, remedy: str) -> None:
        """Raise the one-line error of :meth:`check_schedule`: the method would first act
        ``when`` in a run of ``epochs`` epochs; ``remedy`` names the options to change."""
        raise ConfigError(
            f"method {cls.name!r} would never act: it first acts {when}, and the run has "
            f"{epochs} epochs; {remedy}"
        )

    @classmethod
    def refuse_late_start(cls, start: int, epochs: int, option: str = "start") -> None:
        """:meth:`check_schedule` of a method whose window opens at epoch ``start``, the value
        of its option ``option`` (a window's start or a warm-up's length)."""
        if start >= epochs:
            cls.refuse_idle_schedule(
                f"in epoch {start} (0-based; {option}={start})",
                epochs,
                f"lower method.{option} or raise train.epochs",
            )

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        """Refuse (``ConfigError``) a schedule in which the method would never act, e.g. a
        warm-up as long as the run; called with the validated ``Params`` and ``train.epochs``
        before anything is built, so that such a run fails at once instead of silently training
        as ``joint``. Default: every schedule is accepted."""

    def setup(self, info: ModelInfo) -> nn.Module | None:
        """Check the model and create trainable modules the method owns (returned, or None).

        The trainer optimises, checkpoints and moves the returned module with the model. The base
        records ``info`` and refuses a task or a number of modalities the method is not defined
        for (:attr:`tasks`, :attr:`max_modalities`); subclasses call it first.
        """
        if info.task not in self.tasks:
            raise ConfigError(
                f"method {self.name!r} needs a {' or '.join(self.tasks)} task, got {info.task!r}"
            )
        if self.max_modalities is not None and len(info.modalities) > self.max_modalities:
            raise ConfigError(
                f"method {self.name!r} is defined for at most {self.max_modalities} modalities, "
                f"got {len(info.modalities)}"
            )
        self.info = info
        return None

    # --- step hooks ----------------------------------------------------------------------------
    def step_parts(self, ctx: StepContext) -> Sequence[str | None]:
        """The parts of one batch's step, in order; each part is a full forward, backward and
        optimizer step with ``ctx.part`` set to it (default: one part, ``None``).

        Methods that alternate between modalities within a batch (MLA's one optimizer step per
        modality) return the modalities.
        """
        return (None,)

    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        """The latents of a training step (default: every encoder on its modality).

        Methods that train one modality per part may encode only that one
        (``model.encode(inputs, only=[ctx.part])``). Evaluation always encodes every modality.
        """
        return model.encode(inputs)

    def encode_eval(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The latents at evaluation: validation and test passes, epoch feature passes and the
        end-of-run analysis (default: every encoder on its modality).

        Methods that change the architecture between or inside the encoders (Greedy's cross-modal
        blocks) override it together with :meth:`encode`; it runs without gradients, with the
        model and the method's module in eval mode.
        """
        return model.encode(inputs)

    def transform_latents(self, latents: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        """Change the latents between encoders and heads during training (default: unchanged)."""
        return latents

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        """Named loss terms; the default backward minimises their sum."""
        return {"task": ctx.task_loss(output.logits)}

    def backward(self, losses: Mapping[str, Tensor], ctx: StepContext) -> None:
        """Turn the loss terms into gradients (override for per-loss gradient methods)."""
        ctx.backward(total_loss(losses))

    def rewrite_gradients(self, ctx: StepContext) -> None:
        """Modify ``.grad`` after backward and before the optimizer step (default: nothing)."""

    def predict(self, output: ModelOutput) -> Tensor:
        """The prediction used for evaluation (default: the fused logits)."""
        return output.logits

    def predict_missing(
        self,
        heads: Callable[[Mapping[str, Tensor]], ModelOutput],
        latents: Mapping[str, Tensor],
        missing: Mapping[str, Tensor],
    ) -> Tensor:
        """What the method predicts when a modality is missing at test time (the robustness
        metrics of :mod:`mmbalance.eval.robustness`): modality ``m`` is absent from the samples
        where the boolean ``missing[m]`` ``(B,)`` is true; ``heads`` maps latents to a
        :class:`ModelOutput` (the model's fusion and unimodal heads).

        Default, the convention of concatenation and sum heads: the missing latent is set to
        zero, so that an additive head gets no contribution from it (its bias remains). A method
        with another rule overrides this and says so in :attr:`missing_modality`.
        """
        kept = {
            m: z.masked_fill(missing[m].reshape(-1, *([1] * (z.ndim - 1))), 0.0)
            if m in missing
            else z
            for m, z in latents.items()
        }
        return self.predict(heads(kept))

    # --- epochs --------------------------------------------------------------------------------
    def on_train_start(self, ctx: EpochContext) -> None:
        """Called once, before the first epoch of a fresh run (after any unimodal pre-training),
        and not again on resume: what it sets up (initial-weight snapshots, teachers) must live in
        :meth:`state_dict` or in the module :meth:`setup` returned, so that a resume restores it.
        """

    def phase(self, epoch: int) -> Phase:
        """What trains in ``epoch`` (default: everything, one phase for the whole run).

        A function of the epoch alone, so that a resumed run is in the phase an uninterrupted
        run would be in.
        """
        return Phase()

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Called before each training epoch (after the phase is applied)."""

    def epoch_subsets(self, ctx: EpochContext) -> Sequence[EpochSubset] | None:
        """The subsets the coming epoch trains on, one after the other (default ``None``: the
        whole training split, shuffled, as usual).

        Called right after :meth:`on_epoch_start` with the same context. Each subset is trained
        in batches of ``train.batch_size`` shuffled from ``(train.seed, epoch)`` and the subset's
        position (a remainder that cannot form a batch of 2 is dropped), with
        :attr:`StepContext.subset` set to its name. Indices must be training samples the trainer
        trains on (those of a ``features("train")`` pass); a sample may appear in several
        subsets or in none. Computed from the model at the epoch's start, the subsets of a
        resumed run are those of an uninterrupted one.
        """
        return None

    def lr_scales(self) -> Mapping[str, float]:
        """Learning-rate multipliers by parameter group for the coming epoch (default: none).

        Read after :meth:`on_epoch_start`; the group's rate is ``train.lr`` times the schedule's
        factor times this multiplier (1 for groups not named).
        """
        return {}

    def on_epoch_end(self, ctx: EpochContext) -> None:
        """Called after each epoch's validation; ``ctx.val_metrics`` holds its metrics."""

    @property
    def held_out_fraction(self) -> float:
        """Part of the training split the trainer holds out from training for this method (a
        stratified, seeded subset, readable as split ``held_out`` through
        :attr:`EpochContext.features`); 0 for methods that train on all of it."""
        return 0.0

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a resume (tensors or plain Python values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def module_layout(self) -> dict[str, Any]:
        """How the module :meth:`setup` returned is built now, for a method that
        ``grows_module`` (AUG: the number of classifiers added to each modality); default ``{}``.

        Plain values only; saved next to every checkpoint of the module's weights.
        """
        return {}

    def restore_module_layout(self, layout: Mapping[str, Any]) -> None:
        """Grow (or shrink) the method's module to ``layout``, a :meth:`module_layout` of this
        method, before saved weights of that layout are loaded into it (default: nothing to do).
        New parameters need no particular values: the loaded weights replace them."""


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The sum of named loss terms."""
    if not losses:
        raise ConfigError("the method returned no loss terms")
    return torch.stack([v.reshape(()) for v in losses.values()]).sum()


def unimodal_losses(output: ModelOutput, ctx: StepContext, weight: float) -> dict[str, Tensor]:
    """``weight * task_loss(unimodal head m)`` for every modality with a head."""
    return {f"uni_{m}": weight * ctx.task_loss(u) for m, u in output.unimodal_logits.items()}


def build_method(name: str, params: Mapping[str, Any]) -> Method:
    """Build a registered method from its name and option mapping (validated), for a user's own
    loop (a run's method is built from its resolved ``Params``:
    :func:`mmbalance.builder.build_components`)."""
    cls = METHODS.get(name)
    return cls(build_dataclass(cls.Params, params, f"method.{name}"))
