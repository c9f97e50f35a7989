"""Balancing methods. Importing this package registers every method."""

from mmbalance.methods import baselines, mmpareto  # noqa: F401
from mmbalance.methods.base import (
    METHODS,
    Method,
    ModelInfo,
    StepContext,
    build_method,
    task_loss,
    total_loss,
)

__all__ = [
    "METHODS",
    "Method",
    "ModelInfo",
    "StepContext",
    "build_method",
    "task_loss",
    "total_loss",
]
