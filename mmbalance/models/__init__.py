"""Encoders, fusion heads and the multimodal model."""

from mmbalance.models import (  # noqa: F401  (registers the fusion heads)
    cosine_head,
    shared_head,
)
from mmbalance.models.encoders import ENCODERS, build_encoder
from mmbalance.models.fusion import FUSION_HEADS, FusionHead, build_fusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import FusionOutput, ModelOutput

__all__ = [
    "ENCODERS",
    "FUSION_HEADS",
    "FusionHead",
    "FusionOutput",
    "ModelOutput",
    "MultimodalModel",
    "build_encoder",
    "build_fusion",
]
