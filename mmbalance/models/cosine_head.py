"""The cosine fusion head of MMCosine (Xu et al., ICASSP 2023).

``logits[:, c] = sum_m s * cos(z_m, W_m[c])``: every modality ``m`` has its own class-weight
matrix ``W_m`` (``C x d_m``, no bias); latents and the rows of ``W_m`` are L2-normalised, so each
modality's contribution lies in ``[-s, s]`` and no modality can dominate the fused logits by the
norm of its features or weights alone, only by their direction. ``s`` (``scale``, default 10 as in
the official code) sets how peaked the softmax can get.

The head is additive: its contributions are the per-modality cosine logits and :meth:`combine`
is their sum (there is no bias), so methods that read additive contributions (OGM's score, MCR's
cheap permutation) work on it unchanged.

In the official code (``GeWu-Lab/MMCosine_ICASSP23``, ``main_CD.py``) ``W_m`` are the two halves
of the concat head's weight ``W = [W_a | W_v]``; one matrix per modality is the same parameters
split, and generalises to any number of modalities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.errors import ConfigError
from mmbalance.models.fusion import FUSION_HEADS, FusionHead


def cosine_logits(latent: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * cos(z_i, W_c)`` for every row ``z_i`` of ``latent`` and row ``W_c`` of ``weight``
    (an all-zero latent or weight row gives 0)."""
    return scale * F.normalize(latent, dim=-1) @ F.normalize(weight, dim=-1).T


@FUSION_HEADS.register("cosine")
class CosineFusion(FusionHead):
    """Sum over modalities of scaled cosine similarities between latents and class weights.

    Args:
        scale: s, the scale of every cosine similarity (each modality's logits lie in [-s, s]).
    """

    additive = True

    def __init__(
        self, latent_dims: Mapping[str, int], num_outputs: int, scale: float = 10.0
    ) -> None:
        super().__init__(latent_dims, num_outputs)
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"fusion.scale of the cosine head must be > 0, got {scale!r}")
        self.scale = float(scale)
        self.weights = nn.ParameterDict()
        for m, d in latent_dims.items():
            # nn.Linear's default initialisation of a (C, d) weight
            weight = torch.empty(num_outputs, d)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            self.weights[m] = nn.Parameter(weight)

    def contributions(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: cosine_logits(latents[m], self.weights[m], self.scale) for m in self.modalities}

    def combine(self, contributions: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([contributions[m] for m in self.modalities]).sum(0)
