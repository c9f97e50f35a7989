"""The method interface: how a balancing method plugs into one training loop.

A method is one small class. The loop calls, for every training step::

    latents = encoders(inputs)
    latents = method.transform_latents(latents, ctx)        # (b) forward transformation
    output  = heads(latents)                                # a ModelOutput
    losses  = method.losses(output, ctx)                    # (a) named loss terms
    method.backward(losses, ctx)                            # default: backward of their sum
    method.rewrite_gradients(ctx)                           # (c) e.g. OGM's coefficient
    optimizer.step()

plus ``on_epoch_start`` / ``on_epoch_end`` and ``state_dict`` for state across steps and epochs
(d), and class attributes that declare what the method needs (e). Evaluation uses
``method.predict(output)``. The loop never branches on a method's name.

Nothing here depends on our trainer: build a :class:`StepContext` with
:meth:`StepContext.standalone` and call the hooks from a plain PyTorch loop
(see ``examples/plain_pytorch.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import build_dataclass
from mmbalance.errors import ConfigError
from mmbalance.models.output import FusionOutput, ModelOutput
from mmbalance.registry import Registry

Task = Literal["classification", "regression"]
FusionFn = Callable[[Mapping[str, Tensor], Collection[str]], FusionOutput]


def _sum_all_reduce(t: Tensor) -> Tensor:
    return t


def _plain_backward(loss: Tensor) -> None:
    loss.backward()


@dataclass
class ModelInfo:
    """What a method may know about the model when it is set up."""

    modalities: tuple[str, ...]
    latent_dims: dict[str, int]
    num_outputs: int
    task: Task = "classification"
    additive_fusion: bool = False


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
        logs: scalars the method records for this step (see :meth:`log`).
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
    logs: dict[str, Tensor | float] = field(default_factory=dict)

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


class Method:
    """Base class: plain joint training (one task loss on the fused output).

    Subclasses override only the hooks they need and declare:

    - ``name``: registry name;
    - ``Params``: a dataclass of options (validated, with range checks in ``__post_init__``);
    - ``needs_unimodal_heads``: the model must have one linear head per modality;
    - ``needs_unimodal_pretraining``: encoders start from unimodal pre-training;
    - ``freezes_encoders``: after pre-training, encoders are frozen (eval mode, no gradient).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    needs_unimodal_heads: ClassVar[bool] = False
    needs_unimodal_pretraining: ClassVar[bool] = False
    freezes_encoders: ClassVar[bool] = False

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

    def setup(self, info: ModelInfo) -> nn.Module | None:
        """Check the model and create trainable modules the method owns (returned, or None).

        The trainer optimises, checkpoints and moves the returned module with the model.
        """
        self.info = info
        return None

    # --- step hooks ----------------------------------------------------------------------------
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

    # --- state ---------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each training epoch."""

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a resume (tensors or plain Python values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The sum of named loss terms."""
    if not losses:
        raise ConfigError("the method returned no loss terms")
    return torch.stack([v.reshape(()) for v in losses.values()]).sum()


def unimodal_losses(output: ModelOutput, ctx: StepContext, weight: float) -> dict[str, Tensor]:
    """``weight * task_loss(unimodal head m)`` for every modality with a head."""
    return {f"uni_{m}": weight * ctx.task_loss(u) for m, u in output.unimodal_logits.items()}


METHODS: Registry[type[Method]] = Registry("method")


def build_method(name: str, params: Mapping[str, Any]) -> Method:
    """Build a registered method from its name and option mapping (validated)."""
    cls = METHODS.get(name)
    return cls(build_dataclass(cls.Params, params, f"method.{name}"))
