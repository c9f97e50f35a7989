"""Balancing methods. Importing this package registers every method."""

from mmbalance.methods import agm as agm  # registration
from mmbalance.methods import baselines, mcr, mmpareto, ogm, opm  # noqa: F401  (registration)
from mmbalance.methods import mlb as mlb  # registration
from mmbalance.methods import mmcosine as mmcosine  # registration
from mmbalance.methods import mslr as mslr  # registration
from mmbalance.methods import pmr as pmr  # registration
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
