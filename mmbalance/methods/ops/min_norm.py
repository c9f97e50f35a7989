"""Minimum-norm point in the convex hull of gradients (the MGDA sub-problem).

Given gradients ``g_1, ..., g_K`` the multiple-gradient descent algorithm looks for simplex weights
``w`` minimising ``||sum_i w_i g_i||^2 = w^T G w`` with the Gram matrix ``G_ij = g_i . g_j``. The
result is a common descent direction: it has a non-negative inner product with every ``g_i``.

Everything here works on the Gram matrix only, so a caller that holds gradients spread over many
parameter tensors (or over DDP ranks) reduces them to ``K x K`` inner products first and calls the
solver on that small matrix; all ranks then make the same decision from the same numbers.

Two solvers:

- :func:`min_norm_2`: the closed form for two vectors (what MMPareto uses per encoder);
- :func:`min_norm_weights`: any ``K`` (for variants that put several losses on one encoder),
  accelerated projected gradient on the simplex started from the best pair, so no QP library
  is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def min_norm_2(g11: float, g12: float, g22: float) -> float:
    """Weight ``a`` on ``g_1`` minimising ``||a g_1 + (1 - a) g_2||^2`` over ``a in [0, 1]``.

    Args:
        g11, g12, g22: the inner products ``g_1.g_1``, ``g_1.g_2`` and ``g_2.g_2``.

    The unconstrained minimiser is ``(g22 - g12) / ||g_1 - g_2||^2``; it is projected onto
    ``[0, 1]``, which changes it only when ``g12 >= g11`` (the optimum is ``g_1`` alone, ``a = 1``)
    or ``g12 >= g22`` (``g_2`` alone, ``a = 0``). Those are the two boundary branches of the
    official MGDA code (``_min_norm_element_from2`` in MMPareto and the multi-task MGDA release),
    which return 0.999 and 0.001 there instead of 1 and 0; inside ``(0, 1)`` both return the
    closed form unchanged. When the two vectors coincide every ``a`` is optimal and ``1/2`` is
    returned.
    """
    denom = g11 + g22 - 2.0 * g12
    if denom <= 1e-30 * max(g11 + g22, 1e-300):
        return 0.5
    return min(max((g22 - g12) / denom, 0.0), 1.0)


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` (shape ``(K,)``) onto the probability simplex."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = int(np.nonzero(u - css / np.arange(1, v.size + 1) > 0)[0][-1])
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def min_norm_weights(gram: Tensor, max_iter: int = 10000, tol: float = 1e-12) -> Tensor:
    """Simplex weights ``w`` (shape ``(K,)``) minimising ``w^T gram w``.

    Args:
        gram: a symmetric positive semi-definite ``(K, K)`` Gram matrix of the gradients.
        max_iter: projected-gradient iterations at most.
        tol: stop when an iteration moves the weights by less than this (max-abs).

    Accelerated projected gradient (FISTA with adaptive restart) from the best pair of vectors,
    whose closed form makes ``K = 2`` exact. Frank-Wolfe, the classic MGDA solver, converges
    too slowly to be checked against a brute-force optimum (2 % off after 500 steps in our
    trials). The ``K x K`` problem is solved in float64 NumPy (the Gram matrix of nearly parallel
    gradients is badly conditioned, and tiny torch ops cost microseconds each); the weights come
    back in the Gram matrix's dtype.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {tuple(gram.shape)}")
    k = gram.shape[0]
    g = gram.detach().to(torch.float64).cpu().numpy()
    g = 0.5 * (g + g.T)
    best: tuple[float, int, int, float] = (float(g[0, 0]), 0, 0, 1.0)
    for i in range(k):
        for j in range(i + 1, k):
            a = min_norm_2(float(g[i, i]), float(g[i, j]), float(g[j, j]))
            value = a * a * g[i, i] + 2 * a * (1 - a) * g[i, j] + (1 - a) ** 2 * g[j, j]
            if float(value) < best[0]:
                best = (float(value), i, j, a)
    w = np.zeros(k)
    w[best[1]] += best[3]
    w[best[2]] += 1.0 - best[3]
    lipschitz = 2.0 * float(np.linalg.eigvalsh(g)[-1])
    if k > 2 and lipschitz > 0:
        step = 1.0 / lipschitz
        y, t, value = w.copy(), 1.0, float(w @ g @ w)
        for _ in range(max_iter):
            new = project_simplex(y - step * 2.0 * (g @ y))
            new_value = float(new @ g @ new)
            if new_value > value:  # adaptive restart keeps the iteration monotone
                y, t = w.copy(), 1.0
                continue
            t_next = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
            y = new + ((t - 1.0) / t_next) * (new - w)
            moved = float(np.abs(new - w).max())
            w, t, value = new, t_next, new_value
            if moved < tol:
                break
    return torch.as_tensor(w, dtype=gram.dtype)
