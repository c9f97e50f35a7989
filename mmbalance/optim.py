"""Optimizers and learning-rate schedules, by name.

``train.optimizer`` names an entry of :data:`OPTIMIZERS`, ``train.scheduler`` one of
:data:`SCHEDULES`; adding either is one registered function here. The trainer builds its
optimizer over named parameter groups (see :mod:`mmbalance.methods.base`) and sets every group's
rate each epoch to ``train.lr * lr_factor(train, epoch)`` times the method's factor for the group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmbalance.registry import Registry

if TYPE_CHECKING:
    import torch

    from mmbalance.config import TrainConfig

ParamGroups = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer.

    Attributes:
        build: ``(param_groups, train_config) -> torch.optim.Optimizer``.
        adaptive: it normalises each parameter's update by its gradients' running scale (Adam),
            which largely undoes methods that scale whole gradients or learning rates.
    """

    build: Callable[[ParamGroups, TrainConfig], torch.optim.Optimizer]
    adaptive: bool


@dataclass(frozen=True)
class ScheduleSpec:
    """A registered learning-rate schedule.

    Attributes:
        factor: ``(train_config, epochs_after_warmup) -> multiplier`` of ``train.lr``.
        needs_total: its value depends on ``train.epochs`` (a run then cannot be extended).
    """

    factor: Callable[[TrainConfig, int], float]
    needs_total: bool = False


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer")
SCHEDULES: Registry[ScheduleSpec] = Registry("schedule")


def _sgd(groups: ParamGroups, t: TrainConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def _adam(groups: ParamGroups, t: TrainConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)


def _adamw(groups: ParamGroups, t: TrainConfig) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


OPTIMIZERS.register("sgd")(OptimizerSpec(_sgd, adaptive=False))
OPTIMIZERS.register("adam")(OptimizerSpec(_adam, adaptive=True))
OPTIMIZERS.register("adamw")(OptimizerSpec(_adamw, adaptive=True))

SCHEDULES.register("none")(ScheduleSpec(lambda t, e: 1.0))
SCHEDULES.register("step")(ScheduleSpec(lambda t, e: t.gamma ** (e // t.step_size)))
SCHEDULES.register("cosine")(
    ScheduleSpec(
        lambda t, e: 0.5 * (1 + math.cos(math.pi * e / max(t.epochs - t.warmup_epochs, 1))),
        needs_total=True,
    )
)


def build_optimizer(groups: ParamGroups, t: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, over ``groups``."""
    return OPTIMIZERS.get(t.optimizer).build(groups, t)


def lr_factor(t: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier at ``epoch``: linear warm-up over ``train.warmup_epochs``, then
    the schedule ``train.scheduler`` names."""
    if epoch < t.warmup_epochs:
        return (epoch + 1) / (t.warmup_epochs + 1)
    return SCHEDULES.get(t.scheduler).factor(t, epoch - t.warmup_epochs)
