"""MIDAS: misalignment-based data augmentation (Hwang, Choi, Whang, NeurIPS 2025, "MIDAS:
Misalignment-based Data Augmentation Strategy for Imbalanced Multimodal Learning",
arXiv 2509.25831).

Every sample of a batch also trains as a *misaligned* sample: its modalities are recombined with
those of other samples of the batch that have another label, at the feature level (the paper's
implementation, Appendix A.3: the batch's latents are reused, not re-encoded), and the fused head
is trained on a soft label that says how much each modality's own classifier believes its
source's label::

    sources K_i = (i, j_1, ..., j_{M-1}), each j drawn uniformly among the batch's samples with a
    label other than y_i; a random permutation pi gives modality m the source k_m = K_i[pi(m)]
    (two modalities: (x_i^1, x_j^2) or (x_j^1, x_i^2), equally likely)
    f~_i = (f^1_{k_1}, ..., f^M_{k_M}),   p~_i = softmax(h(f~_i))
    c^m_i = p^m_{k_m}[y_{k_m}] / sum_l p^l_{k_l}[y_{k_l}]       (unimodal heads, no gradient)
    L_mis,i = s_i * ( - sum_c (sum_m a_m c^m_i onehot(y_{k_m}))_c log p~_ic )
    s_i = 1 + (mean_{m: k_m != i} cos(f^m_i, f^m_{k_m}) + 1) / 2      (hard-sample weight)

and the loss is ``L = CE(o, y) + sum_m CE(u_m, y) + lambda mean_i L_mis,i`` (``lambda``:
``misaligned_weight``; ``o`` fused, ``u_m`` the unimodal heads). Weak-modality weighting: ``a``
starts at 1 for every modality at the start of every epoch (Algorithm 1); after each step the
modality with the lowest batch mean of ``c^m``, ``w``, gets
``a_w <- max(1, a_w + eta (mean_i c^w_i - mean_i p~_i[y_{k_w}] / sum_l p~_i[y_{k_l}]))`` and every
other modality's weight is 1 (``eta``: ``weak_step``): the weak modality's share of the soft label
grows while the fused head under-predicts it. During the first ``warmup_epochs`` epochs only
``sum_m CE(u_m, y)`` trains (encoders and unimodal heads), so that the confidences mean something
when the misaligned labels start.

Sources and departures. The official repository (a Lightning ``train.py``, its README indexed)
could not be read: this follows the paper's text, Algorithm 1 and Appendix A.2-A.3.

- Partners: the paper's Sec. 3.2 draws ``j`` with ``y_j != y_i``; Algorithm 1 shuffles the batch.
  Here the partner is drawn among the other-label samples, so no misaligned sample repeats a
  label; a sample whose class fills the whole batch has none, and ``L_mis`` is the mean over the
  samples that have one. The draws use the global random generator, which ``train.seed`` seeds
  and every checkpoint saves, so a run is deterministic under its seed and a killed run resumes
  exactly. Under DDP each process draws partners within its share of the batch.
- The weak-modality update's ``Delta`` is the difference of batch means as the text defines it
  (a summary of the paper, not the paper, shows ``sign(...)``); its means are all-reduced under
  DDP so every process keeps the same weights.
- The hard-sample weight ``s_i`` and the soft label carry no gradient (they are weights).
- ``warmup_epochs``: the paper does not give its value in the text available; the default 1
  suits short runs, and the shipped configs use 5 of 70.
- ``weak_weighting=false`` and ``hard_weighting=false`` turn off the two weights (the paper's
  ablation).

Settings (Appendix A.3): SGD momentum 0.9, lr 1e-3 (Kinetics-Sounds, CREMA-D, Food-101; 1e-2
UCF-101), weight decay 1e-4, batch 64, 70 epochs (30 for Food-101), StepLR(50, 0.1) (15 for
Food-101), concat fusion, ResNet-18 encoders from scratch; ``lambda`` 5 on Kinetics-Sounds and 1
elsewhere, ``eta`` 0.05; selection on validation. Classification only. Logged per step:
``weak_weight_<m>`` (the weights the step used) and ``misaligned`` (how many samples got a
partner).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, EpochContext, Method, ModelInfo, StepContext
from mmbalance.models.output import ModelOutput


def draw_sources(targets: Tensor, num_modalities: int) -> tuple[Tensor, Tensor]:
    """Each sample's sources and which modality takes which, from the global random generator.

    Returns ``sources`` ``(B, M)`` (column ``m``: the sample whose modality ``m`` the misaligned
    sample takes) and ``valid`` ``(B,)`` (the samples that have another-label partner). Row ``i``
    holds ``i`` once and ``M - 1`` partners drawn uniformly among the samples whose label is not
    ``y_i``, in an order drawn uniformly; rows without a partner hold ``i`` everywhere.
    """
    y = targets.detach().cpu()
    b = y.shape[0]
    other = y.unsqueeze(0) != y.unsqueeze(1)  # (B, B): j has another label than i
    valid = other.any(1)
    draws = torch.rand(b, num_modalities - 1, b)
    draws = draws.masked_fill(~other.unsqueeze(1), -1.0)
    partners = draws.argmax(-1)  # (B, M - 1)
    own = torch.arange(b)
    candidates = torch.cat([own.unsqueeze(1), partners], dim=1)  # (B, M): K_i
    order = torch.rand(b, num_modalities).argsort(dim=1)  # pi
    sources = candidates.gather(1, order)
    sources = torch.where(valid.unsqueeze(1), sources, own.unsqueeze(1))
    return sources.to(targets.device), valid.to(targets.device)


def misaligned_confidences(
    unimodal_logits: Mapping[str, Tensor], targets: Tensor, sources: Tensor
) -> Tensor:
    """``(M, B)`` the normalised confidences ``c^m_i``: modality ``m``'s unimodal head on its
    source's label, divided by the sum over modalities (no gradient)."""
    rows = []
    with torch.no_grad():
        for col, logits in enumerate(unimodal_logits.values()):
            src = sources[:, col]
            p = logits.detach().float().softmax(-1)
            rows.append(p[src, targets[src].long()])
    conf = torch.stack(rows)
    return conf / conf.sum(0, keepdim=True).clamp_min(1e-12)


def hard_sample_weights(latents: Mapping[str, Tensor], sources: Tensor) -> Tensor:
    """``(B,)`` ``1 + (s_i + 1) / 2`` with ``s_i`` the mean cosine similarity, over the replaced
    modalities (``k_m != i``), between sample ``i``'s latent and its replacement's (no
    gradient); rows without a replaced modality get 1.5 (``s = 0``)."""
    with torch.no_grad():
        own = torch.arange(sources.shape[0], device=sources.device)
        sims, counts = [], []
        for col, z in enumerate(latents.values()):
            src = sources[:, col]
            replaced = (src != own).float()
            cos = F.cosine_similarity(z.detach().float(), z.detach().float()[src], dim=-1)
            sims.append(cos * replaced)
            counts.append(replaced)
        total, count = torch.stack(sims).sum(0), torch.stack(counts).sum(0)
        mean = torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))
    return 1.0 + (mean + 1.0) / 2.0


def soft_targets(confidences: Tensor, labels: Tensor, weights: Tensor, num_classes: int) -> Tensor:
    """``(B, C)`` ``sum_m a_m c^m_i onehot(y^(m)_i)`` (``labels`` ``(M, B)``: each modality's
    source label; ``weights`` ``(M,)``: the weak-modality weights ``a``)."""
    onehot = F.one_hot(labels.long(), num_classes).to(confidences.dtype)  # (M, B, C)
    return (weights.view(-1, 1, 1) * confidences.unsqueeze(-1) * onehot).sum(0)


def weak_update_sums(
    confidences: Tensor, fused_probs: Tensor, labels: Tensor, valid: Tensor
) -> Tensor:
    """``(3, M)`` the sums over the valid rows that the weak-modality update needs: row 0
    ``sum_i c^m_i``, row 1 ``sum_i p~_i[y^(m)_i] / sum_l p~_i[y^(l)_i]``, row 2 the count of
    valid rows (in every column); summed over processes, they give every process the same
    update (:func:`weak_modality_step`)."""
    mask = valid.to(confidences.dtype)
    picked = fused_probs.gather(1, labels.t().long())  # (B, M): p~_i[y^(m)_i]
    normalised = picked / picked.sum(1, keepdim=True).clamp_min(1e-12)
    conf_sums = (confidences * mask).sum(1)
    fused_sums = (normalised.t() * mask).sum(1)
    return torch.stack([conf_sums, fused_sums, mask.sum().expand_as(conf_sums)])


def weak_modality_step(weights: Tensor, sums: Tensor, step: float) -> Tensor:
    """The weak-modality weights after one update: the modality ``w`` with the lowest mean
    ``c^m`` gets ``max(1, a_w + step * (mean c^w - mean normalised fused confidence of y^(w)))``,
    every other modality 1; unchanged when no row was valid (``sums`` from
    :func:`weak_update_sums`). Tensor operations only: no synchronisation with the host."""
    weights = weights.to(sums.device, sums.dtype)
    count = sums[2, 0]
    weak = sums[0].argmin()
    delta = (sums[0, weak] - sums[1, weak]) / count.clamp_min(1.0)
    grown = (weights[weak] + step * delta).clamp_min(1.0)
    updated = torch.ones_like(weights).index_put((weak.unsqueeze(0),), grown.unsqueeze(0))
    return torch.where(count > 0, updated, weights)


@dataclass
class MIDASParams:
    """MIDAS options.

    Attributes:
        misaligned_weight: ``lambda``, the weight of the misaligned samples' loss (paper: 5 on
            Kinetics-Sounds, 1 elsewhere).
        weak_step: ``eta``, the step of the weak-modality weight's update (paper 0.05).
        warmup_epochs: epochs that train only the unimodal losses before the misaligned samples
            start (not given in the paper's text; 1 by default, 5 in the shipped configs).
        weak_weighting: weight the least confident modality's share of the soft label.
        hard_weighting: weight each misaligned sample by the similarity of its swapped latents.
    """

    misaligned_weight: float = 1.0
    weak_step: float = 0.05
    warmup_epochs: int = 1
    weak_weighting: bool = True
    hard_weighting: bool = True

    def __post_init__(self) -> None:
        check(
            self.misaligned_weight >= 0,
            f"method.misaligned_weight must be >= 0, got {self.misaligned_weight}",
        )
        check(self.weak_step >= 0, f"method.weak_step must be >= 0, got {self.weak_step}")
        check(
            self.warmup_epochs >= 0,
            f"method.warmup_epochs must be >= 0, got {self.warmup_epochs}",
        )


@METHODS.register("midas")
class MIDAS(Method):
    """In-batch misaligned samples trained on confidence-based soft labels, with weak-modality
    and hard-sample weights."""

    name = "midas"
    Params = MIDASParams
    needs_unimodal_heads = True
    search_space = ("method.misaligned_weight", (0.5, 1.0, 5.0))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        cls.refuse_late_start(params.warmup_epochs, epochs, "warmup_epochs")

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.weak_weights: Tensor | None = None  # a_m, reset at every epoch's start

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        if info.task != "classification":
            raise ConfigError(f"method 'midas' needs a classification task, got {info.task!r}")
        self.weak_weights = torch.ones(len(info.modalities))

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if self.info is not None:
            self.weak_weights = torch.ones(len(self.info.modalities))

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        p = self.params
        if not output.unimodal_logits:
            raise ConfigError("method 'midas' needs unimodal heads (set unimodal_heads=true)")
        uni = torch.stack([ctx.task_loss(u) for u in output.unimodal_logits.values()]).sum()
        if ctx.epoch < p.warmup_epochs:
            return {"unimodal": uni}
        if ctx.fusion is None:
            raise ConfigError("method 'midas' needs the fusion head (StepContext.fusion)")
        latents = output.latents
        modalities = list(latents)
        sources, valid = draw_sources(ctx.targets, len(modalities))
        mixed = {m: z[sources[:, col]] for col, (m, z) in enumerate(latents.items())}
        mixed_logits = ctx.fusion(mixed).logits
        confidences = misaligned_confidences(output.unimodal_logits, ctx.targets, sources)
        labels = torch.stack([ctx.targets[sources[:, col]] for col in range(len(modalities))])
        if self.weak_weights is None:
            self.weak_weights = torch.ones(len(modalities))
        weights = self.weak_weights.to(confidences.device, confidences.dtype)
        if not p.weak_weighting:
            weights = torch.ones_like(weights)
        targets = soft_targets(confidences, labels, weights, mixed_logits.shape[-1])
        per_sample = -(targets * mixed_logits.float().log_softmax(-1)).sum(-1)
        if p.hard_weighting:
            per_sample = per_sample * hard_sample_weights(latents, sources)
        mask = valid.to(per_sample.dtype)
        misaligned = (per_sample * mask).sum() / mask.sum().clamp_min(1.0)
        for i, m in enumerate(modalities):
            ctx.log(f"weak_weight_{m}", weights[i])
        ctx.log("misaligned", mask.sum())
        if p.weak_weighting:
            probs = mixed_logits.detach().float().softmax(-1)
            ctx.scratch["midas_update"] = weak_update_sums(confidences, probs, labels, valid)
        return {
            "task": ctx.task_loss(output.logits),
            "unimodal": uni,
            "misaligned": p.misaligned_weight * misaligned,
        }

    def rewrite_gradients(self, ctx: StepContext) -> None:
        # the weak-modality weights' update after the step: it does not change this step's
        # gradients, the next step's loss uses it
        sums = ctx.scratch.get("midas_update")
        if sums is None or self.weak_weights is None:
            return
        if ctx.world_size > 1:
            sums = ctx.all_reduce(sums)
        self.weak_weights = weak_modality_step(
            self.weak_weights, sums.detach(), self.params.weak_step
        )

    def state_dict(self) -> dict[str, Any]:
        weights = self.weak_weights
        return {} if weights is None else {"weak_weights": weights.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "weak_weights" in state:
            self.weak_weights = state["weak_weights"].detach().cpu().clone()
