"""The shared boosting head of ReconBoost (Hua et al., ICML 2024).

``F(x) = beta * sum_m h(z_m)``: every modality's latent goes through the *same* head
``h = Linear(d, hidden) - ReLU - Linear(hidden, C)`` and the outputs are summed and scaled by a
learnable boost rate ``beta`` (initialised at ``boost_rate``, 1 in the official code). Each
``h(z_m)`` is one "modality learner" of the boosted ensemble; ``beta`` is the ensemble's step
size, trained only in ReconBoost's global-rectification phase.

The official code (``models/dynamic_net.py``, huacong/ReconBoost @14ab57a) builds ``h`` as
``Linear(512, 256)-ReLU-Linear(256, C)`` and replaces each encoder's own classifier by it; here
``hidden`` defaults to 256 and the input size is the encoders' common latent size.

The head is additive: modality ``m``'s contribution is ``beta * h(z_m)`` (``h``'s biases are part
of each learner, so there is no separate shared bias), which lets every method that reads
per-modality contributions (OGM's scores, MCR's permutations) run on it too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError
from mmbalance.models.fusion import FUSION_HEADS, FusionHead


@FUSION_HEADS.register("shared_boost")
class SharedBoostHead(FusionHead):
    """``logits = beta * sum_m h(z_m)``: one shared MLP head, a learnable boost rate (ReconBoost).

    Args:
        hidden: width of the shared head's hidden layer.
        boost_rate: initial value of the learnable boost rate beta.
    """

    additive = True
    equal_latent_dims = True

    def __init__(
        self,
        latent_dims: Mapping[str, int],
        num_outputs: int,
        hidden: int = 256,
        boost_rate: float = 1.0,
    ) -> None:
        super().__init__(latent_dims, num_outputs)
        if hidden < 1:
            raise ConfigError(f"shared_boost hidden must be >= 1, got {hidden}")
        size = next(iter(latent_dims.values()))
        self.shared = nn.Sequential(
            nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs)
        )
        self.boost_rate = nn.Parameter(torch.tensor(float(boost_rate)))

    def learner_logits(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``h(z_m)`` for every modality in ``latents`` (any subset): the learners' own logits,
        without the boost rate (ReconBoost's per-learner loss reads these)."""
        return {m: self.shared(z) for m, z in latents.items()}

    def contributions(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.boost_rate * self.shared(latents[m]) for m in self.modalities}

    def combine(self, contributions: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([contributions[m] for m in self.modalities]).sum(0)
