"""Encoders, fusion heads and the multimodal model.

:data:`ENCODERS` and :data:`FUSION_HEADS` know every built-in by name and import its module when
it is first asked for. A new encoder or head is one module registering it and one line in
``BUILTIN_ENCODERS`` or ``BUILTIN_FUSION_HEADS`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mmbalance.registry import Registry, lazy_exports

if TYPE_CHECKING:
    from torch import nn

    from mmbalance.models.fusion import FusionHead

#: Built-in encoder -> the module (of this package) that registers it.
BUILTIN_ENCODERS: dict[str, str] = {
    "mlp": "encoders",
    "resnet18": "encoders",
    "sequence_transformer": "encoders",
}
#: Built-in fusion head -> the module (of this package) that registers it.
BUILTIN_FUSION_HEADS: dict[str, str] = {
    "late_sum": "fusion",
    "concat_linear": "fusion",
    "concat_mlp": "fusion",
    "film": "fusion",
    "gated": "fusion",
    "transformer": "fusion",
    "cosine": "cosine_head",
    "shared_boost": "shared_head",
}

#: Factories ``(input_shape, **params) -> nn.Module`` where ``input_shape`` excludes the batch.
ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder", __name__, BUILTIN_ENCODERS)
FUSION_HEADS: Registry[type[FusionHead]] = Registry("fusion head", __name__, BUILTIN_FUSION_HEADS)

_EXPORTS: dict[str, str] = {
    "build_encoder": "encoders",
    "FusionHead": "fusion",
    "build_fusion": "fusion",
    "MultimodalModel": "multimodal",
    "FusionOutput": "output",
    "ModelOutput": "output",
}

__all__ = ["BUILTIN_ENCODERS", "BUILTIN_FUSION_HEADS", "ENCODERS", "FUSION_HEADS", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)
