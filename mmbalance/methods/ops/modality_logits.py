"""Each modality's own class logits, with gradient (MBSD's self-distillation, AMCo's masks and
LFM's alignment term read them)."""

from __future__ import annotations

import torch
from torch import Tensor

from mmbalance.errors import ConfigError
from mmbalance.models.output import ModelOutput


def modality_logits(output: ModelOutput, fusion: object) -> dict[str, Tensor]:
    """Each modality's own class logits ``z_m``, with gradient.

    Additive heads (``late_sum``, ``concat_linear``): the modality's contribution plus the shared
    bias divided by the number of modalities, ``W_m h_m + b / M``: the slice of the fused linear
    layer that BalanceBenchmark's models and the official codes of MBSD, LFM and AMCo use, so
    that the fused logits are the sum of the modalities' own. Other heads: the unimodal heads
    (the model needs ``unimodal_heads=true``).
    """
    if output.contributions is not None:
        modalities = list(output.contributions)
        bias = getattr(fusion, "bias", None)
        if bias is None:  # a head without a bias attribute: logits = sum of contributions + bias
            bias = output.logits - torch.stack(list(output.contributions.values())).sum(0)
        share = bias / len(modalities)
        return {m: output.contributions[m] + share for m in modalities}
    if not output.unimodal_logits:
        raise ConfigError(
            "this method needs each modality's own logits: use an additive fusion head "
            "(late_sum, concat_linear) or set unimodal_heads=true"
        )
    return dict(output.unimodal_logits)
