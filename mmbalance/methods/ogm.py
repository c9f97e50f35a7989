"""On-the-fly modulation: OGM-GE (CVPR 2022) and the journal's OGM and OPM (TPAMI 2024).

All three methods measure, on every training batch, how well each modality alone predicts the
labels (the *discrepancy score*) and slow down the modality that is ahead:

- ``ogm_ge`` / ``ogm`` scale the dominant modality's encoder gradients by ``1 - tanh(alpha*rho)``
  after backward and before the optimizer step (``ogm_ge`` also adds Gaussian noise, "GE");
- ``opm`` (in :mod:`mmbalance.methods.opm`) drops the dominant modality's features per sample.

Discrepancy score (shared by all three)
---------------------------------------
``s_m = sum_i softmax(z_m,i)[y_i]``: the batch *sum* of the true-class probability of modality
``m``'s own logits ``z_m``. The ratio of two such sums is the papers' ``rho`` (not a mean of
per-sample ratios). ``z_m`` is:

- **additive heads** (``late_sum``, ``concat_linear``): the modality's contribution plus the
  shared bias divided by the number of modalities ``M``, exactly the papers' ``W_m z_m + b/2``
  for two modalities;
- **other heads** (``concat_mlp``, ``film``, ``gated``, ``transformer``): the fusion head
  evaluated with every *other* modality's latent replaced by its batch mean. This keeps the
  head's own non-linear interactions, works for any head and any ``M`` without extra trainable
  probes, and removes exactly the per-sample information the other modalities carry, so what is
  left is what modality ``m`` tells the head about each sample. (Zeroing the others instead
  would feed the head inputs far outside its training distribution; auxiliary probes would add
  parameters and a second training signal.) For an additive head the rule differs from the
  contribution rule only by a per-class constant shared by all samples.

Scores are computed under ``torch.no_grad`` and, under DDP, their sums are all-reduced before any
ratio is taken, so every rank uses the same coefficient and the replicas stay identical.

More than two modalities
------------------------
``rho_m = s_m / reference_m`` with ``reference_m`` the mean (``ratio_to="mean"``, default) or the
largest (``"max"``) of the other modalities' scores. With two modalities both give the papers'
``rho`` and ``1/rho``. With ``"max"`` only the single best modality can have ``rho > 1``; with
``"mean"`` every modality above the average of the rest is slowed.

Which parameters are scaled
---------------------------
``scale_params="conv"`` scales 4-D tensors only (conv kernels), as the official code does; BN and
linear layers are untouched. For MLP or transformer encoders that rule selects nothing, so the
default is ``"all"``: every trainable encoder parameter of the modality. The fusion head and any
unimodal heads are never scaled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import METHODS, Method, ModelInfo, StepContext
from mmbalance.models.output import ModelOutput

RatioRule = Literal["mean", "max"]
_EPS = 1e-12


# --- the shared discrepancy score ---------------------------------------------------------------
def unimodal_score_logits(
    latents: Mapping[str, Tensor],
    fusion: object,
    contributions: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Each modality's own logits ``z_m`` for the discrepancy score (see the module docstring).

    ``contributions`` (from the forward pass of an additive head) avoids recomputing them. Runs
    without building a graph.
    """
    modalities = list(latents)
    with torch.no_grad():
        if contributions is None and getattr(fusion, "additive", False):
            contributions = fusion.contributions(latents)  # type: ignore[attr-defined]
        if contributions is not None:
            bias = getattr(fusion, "bias", None)
            share = 0.0 if bias is None else bias.detach() / len(modalities)
            return {m: contributions[m].detach() + share for m in modalities}
        if fusion is None:
            raise ConfigError("the discrepancy score needs the fusion head (StepContext.fusion)")
        means = {m: z.detach().mean(0, keepdim=True).expand_as(z) for m, z in latents.items()}
        out = {}
        for m in modalities:
            probe = {o: (latents[o].detach() if o == m else means[o]) for o in modalities}
            out[m] = fusion(probe, ()).logits  # type: ignore[operator]
        return out


def score_sums(logits: Mapping[str, Tensor], targets: Tensor) -> Tensor:
    """``(M,)`` batch sums of the true-class softmax probability, one per modality, no graph."""
    with torch.no_grad():
        idx = targets.long().unsqueeze(1)
        return torch.stack([z.float().softmax(-1).gather(1, idx).sum() for z in logits.values()])


def discrepancy_ratios(scores: Tensor, rule: RatioRule = "mean") -> Tensor:
    """``rho_m = s_m / (mean or max of the other scores)``; two modalities give ``(rho, 1/rho)``."""
    m = scores.shape[0]
    if m < 2:
        raise ConfigError(f"discrepancy ratios need at least 2 modalities, got {m}")
    if rule == "mean":
        reference = (scores.sum() - scores) / (m - 1)
    else:
        others = scores.unsqueeze(0).expand(m, m).clone()
        others.fill_diagonal_(-math.inf)
        reference = others.max(1).values
    return scores / reference.clamp_min(_EPS)


def ogm_coefficients(ratios: Tensor, alpha: float) -> Tensor:
    """``k_m = 1 - tanh(alpha * rho_m)`` where ``rho_m > 1``, else 1 (jump at ``rho = 1``)."""
    damped = 1.0 - torch.tanh(alpha * ratios)
    return torch.where(ratios > 1, damped, torch.ones_like(ratios))


def batch_scores(
    latents: Mapping[str, Tensor],
    ctx: StepContext,
    contributions: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Score sums of one step, all-reduced over DDP ranks (identical on every rank)."""
    logits = unimodal_score_logits(latents, ctx.fusion, contributions)
    sums = score_sums(logits, ctx.targets)
    if ctx.world_size > 1:
        sums = ctx.all_reduce(sums)
    return sums


# --- options shared by the family ---------------------------------------------------------------
@dataclass
class ModulationParams:
    """Schedule and ratio options shared by OGM, OGM-GE and OPM.

    Modulation is on in epochs ``start <= epoch <= end`` (0-based, inclusive; ``end=None``: to the
    last epoch) that are also ``>= warmup_epochs`` (the journal code's warm-up: 6 epochs, i.e.
    nothing before epoch 6).

    Attributes:
        start: first epoch (0-based) in which the modulation acts.
        end: last epoch (0-based, inclusive) in which it acts; null: to the last epoch.
        warmup_epochs: epochs without modulation at the start of training.
        ratio_to: what a modality's score is divided by: the ``mean`` or the ``max`` of the
            other modalities' scores (the same with two modalities).
    """

    start: int = 0
    end: int | None = None
    warmup_epochs: int = 0
    ratio_to: RatioRule = "mean"

    def __post_init__(self) -> None:
        check(self.start >= 0, f"method.start must be >= 0, got {self.start}")
        check(
            self.end is None or self.end >= self.start,
            f"method.end must be >= method.start ({self.start}) or null, got {self.end}",
        )
        check(
            self.warmup_epochs >= 0, f"method.warmup_epochs must be >= 0, got {self.warmup_epochs}"
        )

    def active(self, epoch: int) -> bool:
        """Whether modulation applies in ``epoch``."""
        in_window = self.start <= epoch and (self.end is None or epoch <= self.end)
        return in_window and epoch >= self.warmup_epochs


def check_modulation_schedule(cls: type[Method], params: ModulationParams, epochs: int) -> None:
    """Refuse a run none of whose epochs modulates (a warm-up or window beyond the last epoch)."""
    if not any(params.active(e) for e in range(epochs)):
        first = max(params.start, params.warmup_epochs)
        cls.refuse_idle_schedule(
            f"in epoch {first} (0-based; start={params.start}, warmup_epochs="
            f"{params.warmup_epochs})",
            epochs,
            "lower method.warmup_epochs or method.start, or raise train.epochs",
        )


def require_classification(info: ModelInfo, name: str) -> None:
    """The score is a softmax probability of the true class: classification only."""
    if info.task != "classification":
        raise ConfigError(f"method {name!r} needs a classification task, got {info.task!r}")


# --- OGM and OGM-GE ------------------------------------------------------------------------------
@dataclass
class OGMParams(ModulationParams):
    """OGM options (and the schedule options of :class:`ModulationParams`).

    Attributes:
        alpha: modulation strength: the dominant modality's encoder gradient is scaled by
            ``1 - tanh(alpha * rho)``.
        ge: add the generalization-enhancement Gaussian noise to the encoder gradients.
        scale_params: which encoder tensors are modulated: ``all`` trainable ones, or ``conv``
            (4-D kernels only, as the official code does).
        seed: seeds the GE noise, drawn from a generator reseeded every step, so every DDP rank
            draws the same noise.
    """

    alpha: float = 0.8
    ge: bool = False
    scale_params: Literal["all", "conv"] = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}")


@dataclass
class OGMGEParams(OGMParams):
    """OGM-GE: the CVPR defaults (GE noise on); the options of :class:`OGMParams`."""

    ge: bool = True


@METHODS.register("ogm")
class OGM(Method):
    """On-the-fly gradient modulation: ``g_m <- k_m * g_m`` on the dominant encoder(s).

    The coefficient is computed in :meth:`losses` from the batch's scores and applied in
    :meth:`rewrite_gradients` of the same step, so momentum and weight decay act on the scaled
    gradient (as in the official code). With ``ge`` every selected encoder tensor, dominant or
    not, also gets ``N(0, std(g)^2)`` noise with ``std`` of its unmodulated gradient (as the code
    does on every step inside the window). Logged per step: ``rho_<m>``, ``coeff_<m>``.
    """

    name = "ogm"
    Params = OGMParams
    scales_gradients = True  # one factor per encoder: Adam's normalisation largely undoes it
    search_space = ("method.alpha", (0.1, 0.4, 0.8))

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._coeff: dict[str, Tensor] | None = None

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        check_modulation_schedule(cls, params, epochs)

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        require_classification(info, self.name)
        return None

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        self._coeff = None
        if self.params.active(ctx.epoch):
            scores = batch_scores(output.latents, ctx, output.contributions)
            rho = discrepancy_ratios(scores, self.params.ratio_to)
            coeff = ogm_coefficients(rho, self.params.alpha)
            self._coeff = {m: coeff[i] for i, m in enumerate(output.latents)}
            for i, m in enumerate(output.latents):
                ctx.log(f"rho_{m}", rho[i])
                ctx.log(f"coeff_{m}", coeff[i])
        return {"task": ctx.task_loss(output.logits)}

    def selected(self, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
        """The encoder tensors this method rewrites (all, or 4-D conv kernels only)."""
        if self.params.scale_params == "conv":
            return [p for p in params if p.dim() == 4]
        return list(params)

    def rewrite_gradients(self, ctx: StepContext) -> None:
        coeff, self._coeff = self._coeff, None
        if coeff is None:
            return
        generator: torch.Generator | None = None
        for m, k in coeff.items():
            params = self.selected(ctx.encoder_params.get(m, ()))
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            k = k.to(grads[0].device, grads[0].dtype)
            if not self.params.ge:
                if bool(k != 1):
                    torch._foreach_mul_(grads, k)
                continue
            if generator is None or generator.device != grads[0].device:
                generator = torch.Generator(device=grads[0].device)
                generator.manual_seed(self.params.seed * 1_000_003 + ctx.step)
            add_ge_noise(grads, k, generator, one_draw=grads[0].device.type != "cpu")


def add_ge_noise(
    grads: Sequence[Tensor],
    k: Tensor,
    generator: torch.Generator,
    one_draw: bool = False,
) -> None:
    """OGM-GE's update, in place: ``g <- k * g + eps * (std(g) + 1e-8)``, ``eps ~ N(0, I)``.

    ``std(g)`` is the standard deviation of each tensor's unmodulated gradient (0 for a single
    element), as in the official code, which draws ``N(0, (std + 1e-8)^2)`` noise per tensor.

    Two ways to draw the same distribution (independent standard normals for every element):
    ``one_draw`` fills one buffer for all tensors in a single call and applies it with two
    ``foreach`` operations, the fewest kernels (GPUs); otherwise each tensor's noise is drawn into
    one scratch buffer reused across the tensors and added with a fused ``addcmul_``, which on CPU
    avoids allocating (and faulting in) a fresh buffer per tensor and a second pass for the
    product. On CPU the cost that remains is the normal sampler itself, a few ns per element.
    """
    stds = [(g.std() if g.numel() > 1 else g.new_zeros(())) + 1e-8 for g in grads]
    dtypes = {g.dtype for g in grads}
    if one_draw and len(dtypes) == 1:
        first = grads[0]
        flat = torch.empty(sum(g.numel() for g in grads), dtype=first.dtype, device=first.device)
        flat.normal_(generator=generator)
        pieces = flat.split([g.numel() for g in grads])
        noise = [v.view_as(g) for v, g in zip(pieces, grads, strict=True)]
        torch._foreach_mul_(list(grads), k)
        torch._foreach_addcmul_(list(grads), noise, stds)
        return
    scratch: dict[torch.dtype, Tensor] = {}
    for g, std in zip(grads, stds, strict=True):
        if g.dtype not in scratch:
            largest = max(t.numel() for t in grads if t.dtype == g.dtype)
            scratch[g.dtype] = torch.empty(largest, dtype=g.dtype, device=g.device)
        noise = scratch[g.dtype][: g.numel()].view_as(g).normal_(generator=generator)
        g.mul_(k).addcmul_(noise, std)


@METHODS.register("ogm_ge")
class OGMGE(OGM):
    """OGM-GE (CVPR 2022): OGM plus generalization-enhancement noise (``ge`` defaults to on)."""

    name = "ogm_ge"
    Params = OGMGEParams
