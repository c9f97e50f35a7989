"""Balancing methods. Importing this package registers every method."""

from mmbalance.methods import (  # noqa: F401  (registration)
    agm,
    amco,
    baselines,
    cml,
    dr,
    gblending,
    lfm,
    mbsd,
    mcr,
    mlb,
    mmcosine,
    mmpareto,
    mslr,
    ogm,
    opm,
    pmr,
    reconboost,
    umt,
)
from mmbalance.methods.base import (
    METHODS,
    EpochContext,
    Method,
    ModelInfo,
    Phase,
    SplitFeatures,
    StepContext,
    build_method,
    task_loss,
    total_loss,
)
from mmbalance.methods.own_loop import MethodAdapter, OwnModel, StepResult

__all__ = [
    "METHODS",
    "EpochContext",
    "Method",
    "MethodAdapter",
    "ModelInfo",
    "OwnModel",
    "Phase",
    "SplitFeatures",
    "StepContext",
    "StepResult",
    "build_method",
    "task_loss",
    "total_loss",
]
