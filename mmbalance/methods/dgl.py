"""DGL: disentangled gradient learning (Wei, Luo, Luo, ICCV 2025, "Boosting Multimodal Learning
via Disentangled Gradient Learning"; official code shicaiwei123/ICCV2025-GDL @b72a55f,
``main_dgl.py`` and ``models/fusion_modules.py``).

The fused loss's gradient reaches each encoder scaled down by the fusion head, the dominant
encoder's included; DGL cuts it. The encoders learn only from unimodal losses computed through the
fusion head itself, and the head learns only from the fused loss on detached latents::

    o   = h(sg(z_1), ..., sg(z_M))                         fused logits (no gradient to encoders)
    u_m = h(0, ..., z_m, ..., 0)                           modality m alone, the others zeroed
    encoders get  alpha * grad sum_m CE(u_m)               (alpha: ``unimodal_weight``)
    the head gets grad CE(o)

The official step backpropagates ``alpha (CE(u_a) + CE(u_v))``, sets every gradient of the fusion
module to ``None``, backpropagates ``CE(o)``, clips the total gradient norm at 40 and takes one
SGD step. Here the same gradients come from one backward pass of
``CE(o) + alpha sum_m CE(u_m)``: ``u_m`` is evaluated with the head's parameters detached
(``torch.func.functional_call``), so it trains the encoders through the head's current weights
without training the head, and ``o`` on detached latents. The clipping is ``train.grad_clip``
(40 in the shipped configs). Prediction: the fused logits.

Sources and departures:

- The official concat head (``ConcatFusion_DGL``) computes ``u_a = fc_out([z_a, 0])`` with the
  whole bias; every fusion head here gets the same zero-padded input, so ``u_m`` includes what the
  head outputs for zeros (its bias for the linear heads). The official FiLM and gated variants
  define their own unimodal outputs; here they too get the zero-padded input, one rule for every
  head and any number of modalities.
- Under SGD ``alpha`` only rescales the encoders' learning rate (the paper's own remark); under
  Adam the rescaling is almost undone by the normalisation, and ``alpha`` acts only through the
  weight decay and ``eps``. The decoupling itself (what trains what) holds under any optimizer.
- One backward pass instead of two: the same gradients (the two graphs share only the head's
  parameters, whose unimodal gradients the official code discards), and it keeps DDP to one
  reduction per step.

Official settings (``cramed_dgl.sh``, ``ks_dgl.sh``, argument defaults): SGD lr 2e-3, momentum
0.9, weight decay 1e-4, MultiStepLR([70], 0.1), batch 64 (``drop_last``), 100 epochs, concat
head, ResNet-18 encoders from scratch, gradient-norm clip 40; ``alpha`` 4 or 5 on CREMA-D
(logged 77.48 and 78.12), 2 or 3 on Kinetics-Sounds with 3 frames (74.78 to 76.28). The official
code selects on the test set; here the validation split selects. Any task (the task loss is the
run's). Loss terms: ``task`` (the fused loss) and ``unimodal`` (``alpha`` times the sum).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, Method, StepContext
from mmbalance.models.output import ModelOutput


def zero_padded(latents: Mapping[str, Tensor], keep: str) -> dict[str, Tensor]:
    """``latents`` with every modality but ``keep`` replaced by zeros."""
    return {m: z if m == keep else torch.zeros_like(z) for m, z in latents.items()}


def head_with_detached_weights(fusion: nn.Module, latents: Mapping[str, Tensor]) -> Tensor:
    """The fusion head's logits on ``latents`` computed with its parameters detached: the
    gradient reaches the latents (through the head's current weights), not the head."""
    params = {name: p.detach() for name, p in fusion.named_parameters()}
    return functional_call(fusion, params, (dict(latents),)).logits


@dataclass
class DGLParams:
    """DGL options.

    Attributes:
        unimodal_weight: ``alpha``, the weight of the unimodal losses that alone train the
            encoders (official 4 or 5 on CREMA-D, 2 or 3 on Kinetics-Sounds).
    """

    unimodal_weight: float = 4.0

    def __post_init__(self) -> None:
        check(
            self.unimodal_weight > 0,
            f"method.unimodal_weight must be > 0, got {self.unimodal_weight}",
        )


@METHODS.register("dgl")
class DGL(Method):
    """Encoders learn from unimodal losses through the fusion head; the head from the fused loss
    on detached latents."""

    name = "dgl"
    Params = DGLParams
    search_space = ("method.unimodal_weight", (2.0, 4.0, 8.0))

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        fusion = ctx.fusion
        if not isinstance(fusion, nn.Module):
            raise ConfigError("method 'dgl' needs the fusion head as a module (StepContext.fusion)")
        latents = output.latents
        fused = fusion({m: z.detach() for m, z in latents.items()}).logits
        unimodal = torch.stack(
            [
                ctx.task_loss(head_with_detached_weights(fusion, zero_padded(latents, m)))
                for m in latents
            ]
        ).sum()
        return {"task": ctx.task_loss(fused), "unimodal": self.params.unimodal_weight * unimodal}
