"""The structured result of a multimodal forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class FusionOutput:
    """What a fusion head returns.

    Attributes:
        logits: fused predictions, shape ``(N, num_outputs)``.
        contributions: for additive heads, each modality's additive share of ``logits`` (bias
            excluded), so ``logits == sum(contributions.values()) + bias``; ``None`` otherwise.
    """

    logits: Tensor
    contributions: dict[str, Tensor] | None = None


@dataclass
class ModelOutput:
    """Everything a balancing method may need from one forward pass.

    Methods read this instead of attributes stashed on the model, so the same method works with
    our :class:`~mmbalance.models.MultimodalModel` and with a user's own network that fills it in.

    Attributes:
        logits: fused predictions ``(B, num_outputs)``.
        latents: per-modality pooled features ``(B, d_m)`` (after any latent transform).
        unimodal_logits: per-modality predictions of the unimodal heads, where the model has them.
        contributions: per-modality additive logit contributions when the fusion head is additive.
    """

    logits: Tensor
    latents: dict[str, Tensor]
    unimodal_logits: dict[str, Tensor] = field(default_factory=dict)
    contributions: dict[str, Tensor] | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.latents)
