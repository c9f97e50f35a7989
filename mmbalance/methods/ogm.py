"""On-the-fly modulation: OGM-GE (CVPR 2022) and the journal's OGM and OPM (TPAMI 2024).

All three methods measure, on every training batch, how well each modality alone predicts the
labels (the *discrepancy score*) and slow down the modality that is ahead:

- ``ogm_ge`` / ``ogm`` scale the dominant modality's encoder gradients by ``1 - tanh(alpha*rho)``
  after backward and before the optimizer step (``ogm_ge`` also adds Gaussian noise, "GE");
- ``opm`` (in :mod:`mmbalance.methods.opm`) drops the dominant modality's features per sample.

The discrepancy score and the modulation window are shared with OPM
(:mod:`mmbalance.methods.ops.discrepancy`).

Which parameters are scaled
---------------------------
``scale_params="conv"`` scales 4-D tensors only (conv kernels), as the official code does; BN and
linear layers are untouched. For MLP or transformer encoders that rule selects nothing, so the
default is ``"all"``: every trainable encoder parameter of the modality. The fusion head and any
unimodal heads are never scaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.methods.base import METHODS, Method, StepContext
from mmbalance.methods.ops.discrepancy import (
    ModulationParams,
    batch_scores,
    check_modulation_schedule,
    discrepancy_ratios,
)
from mmbalance.models.output import ModelOutput


def ogm_coefficients(ratios: Tensor, alpha: float) -> Tensor:
    """``k_m = 1 - tanh(alpha * rho_m)`` where ``rho_m > 1``, else 1 (jump at ``rho = 1``)."""
    damped = 1.0 - torch.tanh(alpha * ratios)
    return torch.where(ratios > 1, damped, torch.ones_like(ratios))


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
        seed: seeds the GE noise, drawn from generators seeded by it and the step (and the
            modality), so every DDP rank draws the same noise and a resumed run the same as an
            uninterrupted one.
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

    tasks = ("classification",)

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        check_modulation_schedule(cls, params, epochs)

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        if self.params.active(ctx.epoch):
            scores = batch_scores(output.latents, ctx, output.contributions)
            rho = discrepancy_ratios(scores, self.params.ratio_to)
            coeff = ogm_coefficients(rho, self.params.alpha)
            # applied to this step's gradients in rewrite_gradients
            ctx.scratch["coeff"] = {m: coeff[i] for i, m in enumerate(output.latents)}
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
        coeff = ctx.scratch.get("coeff")
        if coeff is None:
            return
        for i, (m, k) in enumerate(coeff.items()):
            params = self.selected(ctx.encoder_params.get(m, ()))
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            k = k.to(grads[0].device, grads[0].dtype)
            if not self.params.ge:
                if bool(k != 1):
                    torch._foreach_mul_(grads, k)
                continue
            # a seed per (run seed, step, modality): every DDP rank and a resumed run draw alike
            seed = (self.params.seed * 1_000_003 + ctx.step) * 1_009 + i
            add_ge_noise(grads, k, seed, one_draw=grads[0].device.type != "cpu")


#: Elements per noise chunk of the CPU draw: each chunk has its own generator, so chunks are
#: drawn in parallel and the noise does not depend on the number of threads.
NOISE_CHUNK = 1 << 18

_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    """The threads drawing noise chunks (as many as torch's intra-op threads), made once."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(1, torch.get_num_threads()), "mmbalance-noise"))
    return _POOL[0]


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of noise chunk ``chunk`` of a draw seeded ``seed`` (a 63-bit mix of both)."""
    return (seed * 0x9E3779B97F4A7C15 + chunk * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def add_ge_noise(grads: Sequence[Tensor], k: Tensor, seed: int, one_draw: bool = False) -> None:
    """OGM-GE's update, in place: ``g <- k * g + eps * (std(g) + 1e-8)``, ``eps ~ N(0, I)``.

    ``std(g)`` is the standard deviation of each tensor's unmodulated gradient (0 for a single
    element), as in the official code, which draws ``N(0, (std + 1e-8)^2)`` noise per tensor.

    Two ways to draw the same distribution (independent standard normals for every element),
    both reproducible from ``seed``:

    - ``one_draw`` (GPUs): one generator fills one buffer for all tensors in a single call, applied
      with two ``foreach`` operations, the fewest kernels;
    - otherwise (CPU, where the normal sampler itself is the cost, a few ns per element and one
      thread per call): the gradients are cut into chunks of at most :data:`NOISE_CHUNK` elements
      (a tensor's elements in order), each with its own generator seeded by
      :func:`chunk_seed`, drawn on as many threads as torch uses into a scratch buffer per
      thread and added with a fused ``addcmul_``. The chunks are fixed by the tensors' sizes
      alone, so the noise is the same whatever the number of threads.
    """
    stds = [(g.std() if g.numel() > 1 else g.new_zeros(())) + 1e-8 for g in grads]
    dtypes = {g.dtype for g in grads}
    if one_draw and len(dtypes) == 1:
        first = grads[0]
        generator = torch.Generator(device=first.device).manual_seed(chunk_seed(seed, 0))
        flat = torch.empty(sum(g.numel() for g in grads), dtype=first.dtype, device=first.device)
        flat.normal_(generator=generator)
        pieces = flat.split([g.numel() for g in grads])
        noise = [v.view_as(g) for v, g in zip(pieces, grads, strict=True)]
        torch._foreach_mul_(list(grads), k)
        torch._foreach_addcmul_(list(grads), noise, stds)
        return
    chunks: list[tuple[Tensor, Tensor, int]] = []  # (gradient piece, its std, chunk seed)
    for g, std in zip(grads, stds, strict=True):
        g.mul_(k)
        flat = g.view(-1) if g.is_contiguous() else None
        if flat is None or g.numel() <= NOISE_CHUNK:
            chunks.append((g, std, chunk_seed(seed, len(chunks))))
            continue
        for piece in flat.split(NOISE_CHUNK):
            chunks.append((piece, std, chunk_seed(seed, len(chunks))))
    workers = max(1, min(torch.get_num_threads(), len(chunks)))
    if workers == 1 or sum(g.numel() for g in grads) <= NOISE_CHUNK:
        _draw_chunks(chunks)
        return
    shares: list[list[tuple[Tensor, Tensor, int]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for chunk in sorted(chunks, key=lambda c: -c[0].numel()):  # largest first, to the least loaded
        w = loads.index(min(loads))
        shares[w].append(chunk)
        loads[w] += chunk[0].numel()
    for done in [_pool().submit(_draw_chunks, share) for share in shares]:
        done.result()


def _draw_chunks(chunks: Sequence[tuple[Tensor, Tensor, int]]) -> None:
    """Add each chunk's noise (its own generator) to it, through one scratch buffer per dtype."""
    scratch: dict[torch.dtype, Tensor] = {}
    for piece, std, seed in chunks:
        if piece.dtype not in scratch:
            largest = max(p.numel() for p, _, _ in chunks if p.dtype == piece.dtype)
            scratch[piece.dtype] = torch.empty(largest, dtype=piece.dtype, device=piece.device)
        generator = torch.Generator(device=piece.device).manual_seed(seed)
        noise = scratch[piece.dtype][: piece.numel()].view_as(piece)
        piece.addcmul_(noise.normal_(generator=generator), std)


@METHODS.register("ogm_ge")
class OGMGE(OGM):
    """OGM-GE (CVPR 2022): OGM plus generalization-enhancement noise (``ge`` defaults to on)."""

    name = "ogm_ge"
    Params = OGMGEParams
