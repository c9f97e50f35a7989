"""One modality per part of a step, for the methods that take one optimizer step per modality
inside every batch (MLA, AUG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mmbalance.errors import ConfigError
from mmbalance.methods.base import Method, StepContext


class OneModalityPerPart(Method):
    """A method whose step has one part per modality, in the model's order: each part encodes
    its modality alone (``ctx.part``), and the other modalities' latents are zeros only so that
    the model's own heads can run (they get no gradient). Evaluation encodes every modality."""

    def step_parts(self, ctx: StepContext) -> Sequence[str | None]:
        if self.info is None:
            raise RuntimeError(f"call setup() before training {self.name!r}")
        return self.info.modalities

    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        if ctx.part is None:
            raise ConfigError(
                f"method {self.name!r} trains one modality per part: run each part of "
                "method.step_parts(ctx) with ctx.part set to it"
            )
        return model.encode(inputs, only=[ctx.part])  # type: ignore[operator]

    def transform_latents(self, latents: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if self.info is None:
            raise RuntimeError(f"call setup() before training {self.name!r}")
        present = next(iter(latents.values()))
        return {
            m: latents[m] if m in latents else present.new_zeros(present.shape[0], d)
            for m, d in self.info.latent_dims.items()
        }
