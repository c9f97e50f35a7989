"""The arithmetic precision of the hand-differentiated losses in :mod:`mmbalance.methods.ops`."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32: half-precision inputs are upcast for the loss arithmetic, float64 stays
    float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
