"""Gradient routing: identity in the forward pass, a chosen factor in the backward pass.

A method that wants one path of the graph to carry ``k`` times its gradient (MLB's coefficient on
a modality's fused gradient, AGM's coefficient on each Shapley response, MCR's game weights on
each modality's input to a perturbed prediction) wraps the tensor in :func:`scale_grad`; forward
values are exact (no ``k x + (1 - k) x`` rounding). :func:`multiply_by` does the same as a tensor
hook, for a tensor that already exists in the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``k`` (broadcast)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (k,) = ctx.saved_tensors
        return grad * k.to(grad.dtype), None


def scale_grad(x: Tensor, k: Tensor | float) -> Tensor:
    """``x`` in value; the gradient flowing back through it is multiplied by ``k`` (a scalar, or
    a tensor that broadcasts against ``x``, treated as a constant)."""
    k_t = torch.as_tensor(k, device=x.device).detach()
    return ScaleGrad.apply(x, k_t)


def multiply_by(k: Tensor) -> Callable[[Tensor], Tensor]:
    """A tensor hook that multiplies the gradient reaching the tensor by ``k``."""
    return lambda grad: grad * k.to(grad.dtype)
