"""MLA: multimodal learning with alternating unimodal adaptation (Zhang, Yoon, Bansal, Yao,
CVPR 2024; official code Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation).

Training alternates between the modalities inside every batch: one part per modality, each a
full forward, backward and optimizer step (:meth:`MLA.step_parts`) that encodes only that
modality and classifies it with one linear head shared by all modalities,
``loss_m = CE(W z_m + b, y)``. Sharing the head is what lets the modalities interact; to keep one
modality's step from erasing what the head learned from the others, the head's weight gradient
is projected (orthogonal weight modification, OWM) before each step::

    r     = batch mean of the part's features z_m          (all-reduced under DDP)
    alpha = 0.1 ** (1 + b / N)                             (batch b of N in the epoch)
    k     = P r
    P    <- P - k k^T / (alpha + r^T k)                    (recursive least squares, OWM)
    P    <- P / ||P||_F                                    (``normalize_projector``, official)
    dL/dW <- dL/dW P^T

``P`` starts as the identity, is kept across batches, modalities and epochs (a buffer of the
method's module, so it is checkpointed and a resumed run continues it), and the very first part
of training neither updates nor applies it (the official ``exp_count != 0`` guard). Because
``P_new r = alpha / (alpha + r^T P r) * P r``, the projected gradient has (almost) no component
along the feature directions seen so far: the update of the head is orthogonal to the stored
feature subspace up to the regulariser ``alpha``. Only the weight is projected, not the bias.

Inference combines the shared head's per-modality logits with entropy gates computed *per
sample*: ``H_m(x) = -sum_c p_c log p_c`` with ``p = softmax(W z_m(x) + b)``,
``w_m(x) = exp(H_max(x) - H_m(x)) / sum_m' exp(H_max(x) - H_m'(x))`` and the prediction
``sum_m w_m(x) (W z_m(x) + b)`` (``gating="entropy"``), so a sample's confident modality
dominates that sample's prediction. ``gating="uniform"`` averages the logits instead (the
official code without ``--dynamic``: ``av_alpha = 0.5``).

Where this follows or departs from the official code and from BalanceBenchmark (BB):

- Gates per sample (the paper's definition; BB's ``calculate_entropy`` is per sample too). The
  official ``calculate_entropy`` takes the softmax over dim 0 (the batch) and sums the entropy
  over the whole batch, so its two gates are two scalars per *batch*; the MCR authors' port
  (kkontras ``MLA_Model``) copies that. A sample's weights then depend on which other samples
  share its evaluation batch; here they do not.
- **The projector's denominator departs from the official code.** The official
  ``GSPlugin.before_update`` (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation
  @ab6c184, ``utils/utils.py``; BB's ``MLA_trainer.py`` @4c1482f copies it) holds ``r`` as a
  ``(1, d)`` row and writes ``P - torch.mm(k, k^T) / (alpha + torch.mm(k, r))``: ``torch.mm(k, r)``
  is the ``d x d`` outer product ``k r``, so every entry of ``k k^T`` is divided by its own entry
  of ``alpha + k r``, an element-wise division that is not the recursive-least-squares update and
  does not make the projected gradient orthogonal to the stored features. Here the denominator is
  the scalar ``alpha + r^T k = alpha + r^T P r`` of OWM and the paper, the correct orthogonal
  projection. The rest follows ``before_update`` (the update with the current part's mean
  feature, the Frobenius normalisation, ``grad @ P^T``).
- The projection is applied. In the official repository it never runs: it is guarded by
  ``name == "module.weight"`` while the head's parameters are named ``weight`` and ``bias``. BB
  matches the name but *adds* the projected gradient, ``grad <- grad + grad P^T``, which is not a
  projection. Here the gradient is replaced by its projection, as OWM and the paper describe. ``normalize_projector=false``
  drops the Frobenius normalisation (plain OWM): the normalisation keeps ``P``'s scale at 1
  instead of letting it shrink towards 0 as directions are stored, and with it the head's
  gradient is scaled by roughly ``1/sqrt(d - rank)``.
- Each part encodes only its own modality, as the official code's ``fc_out(a)`` / ``fc_out(v)``
  parts use only one modality's features (the official code encodes both modalities once per
  batch and then steps twice through that graph; the visual encoder's weights do not change in
  the audio step, so this is the same computation). The model's own fusion and unimodal heads
  are not trained (they get no gradient); the other modalities' latents are zeros only so that
  the model's heads can run.
- BB's ``modulation_starts`` window (joint training outside it) is not reproduced: MLA
  alternates from the first step, as the official code does.

Official settings (README, CREMA-D): SGD lr 1e-3, momentum 0.9, weight decay 1e-4, StepLR(70,
0.1), batch 64, 100 epochs, ResNet-18 encoders from scratch, shared head on 512-d features.
Repository issue #3: the reported 80 % needs batch 16, 200 epochs and the decay at 150.
Logged per step: ``mla_alpha``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, ModelInfo, StepContext
from mmbalance.methods.ops.one_modality_per_part import OneModalityPerPart
from mmbalance.models.output import ModelOutput


def projector_alpha(progress: float, base: float = 0.1) -> float:
    """The OWM regulariser at a fraction ``progress`` of the epoch: ``base ** (1 + progress)``."""
    return base ** (1.0 + progress)


def owm_update(projector: Tensor, feature: Tensor, alpha: float, normalize: bool) -> Tensor:
    """One recursive-least-squares update of the projector by the feature vector ``r``:
    ``k = P r``, ``P - k k^T / (alpha + r^T k)``, then divided by its Frobenius norm if
    ``normalize``."""
    r = feature.reshape(-1, 1).to(projector.dtype)
    k = projector @ r
    updated = projector - (k @ k.T) / (alpha + (r.T @ k))
    if normalize:
        updated = updated / torch.linalg.matrix_norm(updated)
    return updated


def project_gradient(grad: Tensor, projector: Tensor) -> Tensor:
    """The OWM-modified weight gradient ``grad P^T`` (``grad`` is ``(C, d)``)."""
    return grad @ projector.T


def entropy_gates(logits: Sequence[Tensor]) -> Tensor:
    """Per-sample gates ``(M, N)``: ``w_m = exp(H_max - H_m) / sum_m' exp(H_max - H_m')`` with
    ``H_m`` the entropy of ``softmax(logits[m])`` of each sample."""
    log_p = torch.stack([z.float().log_softmax(-1) for z in logits])  # (M, N, C)
    entropy = -(log_p.exp() * log_p).sum(-1)  # (M, N)
    raw = torch.exp(entropy.max(0, keepdim=True).values - entropy)
    return raw / raw.sum(0, keepdim=True)


class SharedHead(nn.Module):
    """The head shared by every modality, with the OWM projector of its weight as a buffer."""

    def __init__(self, dim: int, num_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_outputs)
        self.register_buffer("projector", torch.eye(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z)


@dataclass
class MLAParams:
    """MLA options.

    Attributes:
        gating: how the shared head's per-modality logits are combined at inference:
            ``entropy`` (per-sample gates ``exp(H_max - H_m)``, the paper) or ``uniform`` (their
            mean, the official code without ``--dynamic``).
        projection: project the shared head's weight gradient with the OWM projector.
        normalize_projector: divide the projector by its Frobenius norm after every update, as
            the official code does; ``false`` is plain OWM.
        alpha_base: base of the OWM regulariser ``alpha = alpha_base ** (1 + b / N)`` at batch
            ``b`` of the epoch's ``N`` (official 0.1).
    """

    gating: Literal["entropy", "uniform"] = "entropy"
    projection: bool = True
    normalize_projector: bool = True
    alpha_base: float = 0.1

    def __post_init__(self) -> None:
        check(
            0 < self.alpha_base < 1, f"method.alpha_base must be in (0, 1), got {self.alpha_base}"
        )


@METHODS.register("mla")
class MLA(OneModalityPerPart):
    """Alternating unimodal steps through a shared head with OWM projection; entropy gating."""

    name = "mla"
    tasks = ("classification",)
    Params = MLAParams

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.head: SharedHead | None = None

    def setup(self, info: ModelInfo) -> nn.Module:
        super().setup(info)
        dims = set(info.latent_dims.values())
        if len(dims) != 1:
            raise ConfigError(
                f"method 'mla' shares one head across modalities, so every latent must have the "
                f"same size; got {info.latent_dims}"
            )
        self.head = SharedHead(dims.pop(), info.num_outputs)
        return self.head

    def _require_head(self) -> SharedHead:
        if self.head is None:
            raise RuntimeError("call setup() before training or evaluating MLA")
        return self.head

    # --- the alternating step (its parts and encoding: OneModalityPerPart) --------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        head = self._require_head()
        m = ctx.part
        if m is None:
            raise ConfigError("MLA trains one modality per part (ctx.part is None)")
        z = output.latents[m]
        # the part's features update the projector in rewrite_gradients
        ctx.scratch["feature_sum"] = z.detach().float().sum(0)
        ctx.scratch["count"] = z.shape[0]
        return {f"uni_{m}": ctx.task_loss(head(z))}

    def rewrite_gradients(self, ctx: StepContext) -> None:
        head = self._require_head()
        feature_sum = ctx.scratch.pop("feature_sum", None)
        if not self.params.projection or feature_sum is None:
            return
        weight = head.linear.weight
        alpha = projector_alpha(ctx.epoch_progress, self.params.alpha_base)
        ctx.log("mla_alpha", alpha)
        count = torch.tensor(float(ctx.scratch["count"]), device=feature_sum.device)
        if ctx.world_size > 1:  # every rank projects the (all-reduced) gradient alike
            feature_sum, count = ctx.all_reduce(feature_sum), ctx.all_reduce(count)
        with torch.no_grad():
            if int(head.updates) > 0 and weight.grad is not None:
                projector = owm_update(
                    head.projector, feature_sum / count, alpha, self.params.normalize_projector
                )
                head.projector.copy_(projector)
                weight.grad.copy_(project_gradient(weight.grad, projector.to(weight.grad.dtype)))
            head.updates += 1

    # --- inference ------------------------------------------------------------------------------
    def modality_logits(self, latents: Mapping[str, Tensor]) -> list[Tensor]:
        """The shared head's logits for every modality's latents."""
        head = self._require_head()
        return [head(latents[m]) for m in latents]

    def predict(self, output: ModelOutput) -> Tensor:
        logits = self.modality_logits(output.latents)
        if self.params.gating == "uniform":
            return torch.stack(logits).mean(0)
        gates = entropy_gates(logits).to(logits[0].dtype)
        return (gates.unsqueeze(-1) * torch.stack(logits)).sum(0)
