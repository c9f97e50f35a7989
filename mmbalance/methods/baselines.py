"""Baselines: joint training, unimodal, ensemble, multi-loss and unimodal pre-training.

These are the reference points of every balancing paper; each is a few lines on the method
interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    Method,
    ModelInfo,
    StepContext,
    unimodal_losses,
)
from mmbalance.models.output import ModelOutput


@METHODS.register("joint")
class Joint(Method):
    """One task loss on the fused output (the default joint training)."""

    name = "joint"


@dataclass
class MultiLossParams:
    """Options of multiloss.

    Attributes:
        lam_uni: weight of each unimodal head's loss next to the fused loss.
    """

    lam_uni: float = 1.0

    def __post_init__(self) -> None:
        check(self.lam_uni >= 0, f"method.lam_uni must be >= 0, got {self.lam_uni}")


@METHODS.register("multiloss")
class MultiLoss(Method):
    """Fused loss plus ``lam_uni`` times one unimodal-head loss per modality."""

    name = "multiloss"
    Params = MultiLossParams
    needs_unimodal_heads = True
    search_space = ("method.lam_uni", (0.3, 1.0, 3.0))

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        return {"task": ctx.task_loss(output.logits)} | unimodal_losses(
            output, ctx, self.params.lam_uni
        )


@dataclass
class UnimodalParams:
    """Options of unimodal.

    Attributes:
        modality: the one modality trained and evaluated (null: the dataset's first); a
            comparison runs one variant per modality.
    """

    modality: str | None = None


@METHODS.register("unimodal")
class Unimodal(Method):
    """One modality alone: its encoder and unimodal head (default: the first modality)."""

    name = "unimodal"
    Params = UnimodalParams
    needs_unimodal_heads = True

    @classmethod
    def variants(cls, name: str, modalities: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        return [(f"{name}[{m}]", {"modality": m}) for m in modalities]

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        if self.params.modality is None:
            self.params.modality = info.modalities[0]
        if self.params.modality not in info.modalities:
            raise ConfigError(
                f"method.modality={self.params.modality!r} is not one of {list(info.modalities)}"
            )
        return None

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        return {"task": ctx.task_loss(output.unimodal_logits[self.params.modality])}

    def predict(self, output: ModelOutput) -> Tensor:
        return output.unimodal_logits[self.params.modality]


@dataclass
class EnsembleParams:
    """Options of ensemble.

    Attributes:
        combine: average the unimodal heads' ``logits``, or their softmax ``probs`` (scored as
            log-probabilities).
    """

    combine: Literal["logits", "probs"] = "logits"


def ensemble_prediction(
    output: ModelOutput, combine: str = "logits", missing: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Average of the unimodal heads' logits (or of their probabilities, as log-probabilities);
    with ``missing`` (``{modality: (B,) bool}``), each sample's average runs over the heads of
    the modalities it has (a sample with none gets zero logits: the uniform prediction)."""
    stacked = torch.stack(list(output.unimodal_logits.values()))
    if combine == "probs":
        stacked = stacked.softmax(-1)
    if missing is None:
        mean = stacked.mean(0)
    else:
        present = torch.stack(
            [
                ~missing[m] if m in missing else torch.ones_like(u[:, 0], dtype=torch.bool)
                for m, u in output.unimodal_logits.items()
            ]
        ).to(stacked.dtype)[..., None]  # (M, B, 1)
        mean = (stacked * present).sum(0) / present.sum(0).clamp_min(1.0)
        if combine == "probs":
            uniform = torch.full_like(mean, 1.0 / mean.shape[-1])
            mean = torch.where(present.sum(0) > 0, mean, uniform)
    return mean.clamp_min(1e-12).log() if combine == "probs" else mean


@METHODS.register("ensemble")
class Ensemble(Method):
    """Independently trained unimodal models, predictions averaged.

    Each encoder is trained only by its own unimodal loss; encoders share no parameters, so
    summing the losses trains them independently. The fusion head is not used.
    """

    name = "ensemble"
    Params = EnsembleParams
    needs_unimodal_heads = True

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        return unimodal_losses(output, ctx, 1.0)

    missing_modality = "the average over the heads of the modalities present"

    def predict(self, output: ModelOutput) -> Tensor:
        return ensemble_prediction(output, self.params.combine)

    def predict_missing(
        self,
        heads: Callable[[Mapping[str, Tensor]], ModelOutput],
        latents: Mapping[str, Tensor],
        missing: Mapping[str, Tensor],
    ) -> Tensor:
        """An ensemble without a modality is the other modalities' models: the average runs
        over the heads of the modalities each sample has."""
        return ensemble_prediction(heads(latents), self.params.combine, missing)


@METHODS.register("unipre_frozen")
class UniPreFrozen(Method):
    """Unimodal pre-training, then a fusion head trained on the frozen encoders."""

    name = "unipre_frozen"
    needs_unimodal_heads = True
    needs_unimodal_pretraining = True
    freezes_encoders = True


@METHODS.register("unipre_finetuned")
class UniPreFinetuned(Method):
    """Unimodal pre-training, then joint training of encoders and fusion head."""

    name = "unipre_finetuned"
    needs_unimodal_heads = True
    needs_unimodal_pretraining = True
