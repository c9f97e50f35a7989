"""The multimodal model: named encoders, a fusion head and optional unimodal heads."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from torch import Tensor, nn

from mmbalance.errors import DataError
from mmbalance.models.fusion import FusionHead
from mmbalance.models.output import ModelOutput

LatentTransform = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class MultimodalModel(nn.Module):
    """``encoders[m](x[m]) -> z[m]``, ``fusion(z) -> logits``, ``unimodal_heads[m](z[m])``.

    The forward returns a :class:`ModelOutput`. ``latent_transform`` (used by methods that drop or
    perturb features, like OPM) is applied between the encoders and the heads.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: FusionHead,
        unimodal_heads: bool | Mapping[str, nn.Module] = False,
    ) -> None:
        """``unimodal_heads``: a linear head per modality (``True``), none (``False``), or the
        heads themselves by modality (a user's model seen through
        :class:`~mmbalance.methods.adapter.MethodAdapter`, whose fusion may be any module with
        the fusion heads' interface and ``modalities``)."""
        super().__init__()
        if len(encoders) < 2:
            raise DataError(f"a multimodal model needs at least 2 modalities, got {list(encoders)}")
        if tuple(encoders) != tuple(fusion.modalities):
            raise DataError(
                f"encoders {list(encoders)} and fusion head {list(fusion.modalities)} "
                "name different modalities"
            )
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        if isinstance(unimodal_heads, Mapping):
            heads = {m: unimodal_heads[m] for m in encoders if m in unimodal_heads}
        elif unimodal_heads:
            heads = {m: nn.Linear(fusion.latent_dims[m], fusion.num_outputs) for m in encoders}
        else:
            heads = {}
        self.unimodal_heads = nn.ModuleDict(heads)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.fusion.modalities)

    def encode(
        self, inputs: Mapping[str, Tensor], only: Collection[str] | None = None
    ) -> dict[str, Tensor]:
        """Run every encoder (or those of ``only``) on its modality; the input keys must match
        the model's modalities."""
        if set(inputs) != set(self.modalities):
            raise DataError(
                f"the data has modalities {sorted(inputs)} but the model expects "
                f"{sorted(self.modalities)}"
            )
        chosen = self.modalities if only is None else [m for m in self.modalities if m in only]
        return {m: self.encoders[m](inputs[m]) for m in chosen}

    def heads(self, latents: Mapping[str, Tensor], stop_grad: Collection[str] = ()) -> ModelOutput:
        """Fusion and unimodal heads on given latents (which may be permuted, masked, ...)."""
        fused = self.fusion(latents, stop_grad)
        unimodal = {m: head(latents[m]) for m, head in self.unimodal_heads.items()}
        return ModelOutput(fused.logits, dict(latents), unimodal, fused.contributions)

    def forward(
        self, inputs: Mapping[str, Tensor], latent_transform: LatentTransform | None = None
    ) -> ModelOutput:
        latents = self.encode(inputs)
        if latent_transform is not None:
            latents = latent_transform(latents)
        return self.heads(latents)

    def encoder_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters of each encoder, by modality (for gradient-rewriting methods)."""
        return {
            m: [p for p in enc.parameters() if p.requires_grad] for m, enc in self.encoders.items()
        }
