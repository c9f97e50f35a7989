"""Balancing methods. Importing this package registers every method."""

from mmbalance.methods import (  # noqa: F401  (registration)
    amco,
    baselines,
    cml,
    greedy,
    inforeg,
    lfm,
    mbsd,
    mcr,
    mla,
    mmpareto,
    ogm,
    opm,
    umt,
    valuation,
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

__all__ = [
    "METHODS",
    "EpochContext",
    "Method",
    "ModelInfo",
    "Phase",
    "SplitFeatures",
    "StepContext",
    "build_method",
    "task_loss",
    "total_loss",
]
