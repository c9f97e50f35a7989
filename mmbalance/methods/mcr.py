"""MCR: the Multimodal Competition Regularizer (arXiv 2411.07335).

The loss is ``L = task + lam_uni * sum_m CE(unimodal_m) + R_MIPD + lam_con * L_Con + lam_ceb *
L_CEB``:

- **R_MIPD** (unique information). For a non-empty proper subset ``S`` of the modalities,
  ``L_MIPD,S = -D(y_hat, y_hat with the latents of S perturbed)``, where ``D`` is the
  Jensen-Shannon divergence of the softmax predictions (MSE for regression) and the perturbation
  is by default a within-batch permutation, drawn ``K`` times per step. The game strategy with
  coefficient ``k`` (greedy -1, independent 0, collaborative +1) gives encoder ``j`` the gradient
  ``lam * (sum_{S contains j} grad L_MIPD,S + k * sum_{S without j} grad L_MIPD,S)``. It is
  realised in one backward pass with stop-gradient masks in the fusion head: the term
  ``(S, j)`` evaluates the head with every modality but ``j`` detached and carries weight
  ``-lam`` if ``j`` is in ``S`` and ``-k * lam`` otherwise. Forward values do not depend on the
  mask, only the gradient routing does. Collaborative play is the plain sum
  ``-lam * sum_S D_S`` (no masks needed: every parameter minimises every term).
- **L_Con** (shared information): supervised NT-Xent over the L2-normalised latents of all
  modalities; positives are same-label pairs within and across modalities.
- **L_CEB** (task-irrelevant shared information): a small head reconstructs the concatenated
  latents from the label (the paper) or from the detached fused logits (the reference code).

Permuting in latent space is what makes MCR cheap: for additive heads (``late_sum``,
``concat_linear``) the per-modality logit contributions are permuted and recombined, so the extra
cost is a gather and a sum over ``K * B`` rows of ``C`` logits; other heads are re-evaluated once per
mask on ``K * B`` rows. Neither re-runs an encoder.

Unimodal pre-training initialisation (``--pre`` in the paper) is the trainer's
``train.unimodal_pretrain_epochs``: with it > 0, each encoder and its unimodal head start from a
unimodal run of that many epochs.

Three known faults of the reference release are avoided here by construction: the regularizer is
part of the returned loss, the strategy option selects the weights, and every modality (not only
the last) is detached in the masked evaluations for any number of modalities.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    Method,
    ModelInfo,
    StepContext,
    Task,
    unimodal_losses,
)
from mmbalance.models.output import ModelOutput

Strategy = Literal["greedy", "independent", "collaborative"]
STRATEGY_K: dict[str, float] = {"greedy": -1.0, "independent": 0.0, "collaborative": 1.0}
_LN2 = math.log(2.0)


# --- divergences ---------------------------------------------------------------------------------
def jsd_rows(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise Jensen-Shannon divergence (natural log) between ``softmax(u)`` and ``softmax(v)``.

    Computed in log space (``log m = logaddexp(log p, log q) - ln 2``) so that it stays finite and
    differentiable for saturated predictions; the value lies in ``[0, ln 2]``.
    """
    logp = F.log_softmax(u, dim=-1)
    logq = F.log_softmax(v, dim=-1)
    logm = torch.logaddexp(logp, logq) - _LN2
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def jsd(u: Tensor, v: Tensor) -> Tensor:
    """Mean over rows of :func:`jsd_rows` (the reference code's "batchmean")."""
    return jsd_rows(u, v).mean()


def divergence_rows(u: Tensor, v: Tensor, task: Task) -> Tensor:
    """JSD for classification, the mean squared difference of the outputs for regression."""
    if task == "classification":
        return jsd_rows(u, v)
    return (u - v).pow(2).mean(-1)


# --- contrastive loss -----------------------------------------------------------------------------
def nt_xent(latents: Mapping[str, Tensor], labels: Tensor, temperature: float) -> Tensor:
    """Supervised NT-Xent over the L2-normalised latents of all modalities.

    The ``M * B`` embeddings are pooled; the label of row ``(m, b)`` is ``labels[b]``. Every other
    row with the same label is a positive, every row with another label a negative, and each
    positive pair ``(a, p)`` costs ``-log(e^{s_ap} / (e^{s_ap} + sum_{n in neg(a)} e^{s_an}))`` with
    ``s`` the cosine similarity over ``temperature``; the loss is the mean over positive pairs.
    Passing sample indices as ``labels`` gives the plain cross-modal InfoNCE.
    """
    dims = {z.shape[1] for z in latents.values()}
    if len(dims) != 1:
        raise ConfigError(f"mcr's contrastive loss needs equal latent sizes, got {sorted(dims)}")
    emb = F.normalize(torch.cat(list(latents.values())), dim=-1)
    lab = labels.repeat(len(latents))
    sim = emb @ emb.T / temperature
    same = lab[:, None] == lab[None, :]
    eye = torch.eye(len(lab), dtype=torch.bool, device=emb.device)
    positive = (same & ~eye).to(sim.dtype)
    neg_lse = torch.logsumexp(sim.masked_fill(same, float("-inf")), dim=1, keepdim=True)
    pair = torch.logaddexp(sim, neg_lse) - sim
    # masked mean without boolean indexing, so no host-device synchronisation (0 if no pair)
    return (pair * positive).sum() / positive.sum().clamp_min(1.0)


# --- permutations ---------------------------------------------------------------------------------
def draw_donors(
    targets: Tensor, k: int, kind: str, generator: torch.Generator | None = None
) -> Tensor:
    """``(k, B)`` donor indices: row ``b`` of draw ``i`` takes its perturbed latent from
    ``donors[i, b]``.

    - ``uniform``: ``k`` independent uniform permutations (fixed points allowed);
    - ``derangement``: ``pi o shift o pi^-1`` with a random non-zero cyclic shift, a permutation
      without fixed points in which each row's donor is uniform over the other rows;
    - ``different_label``: each donor drawn uniformly among rows with another target (rows with
      no such row in the batch fall back to any other row, or themselves when ``B = 1``).
    """
    b = targets.shape[0]
    device = targets.device
    if kind == "uniform" or (kind == "derangement" and b < 2):
        return torch.rand(k, b, generator=generator, device=device).argsort(dim=1)
    if kind == "derangement":
        perm = torch.rand(k, b, generator=generator, device=device).argsort(dim=1)
        shift = torch.randint(1, b, (k, 1), generator=generator, device=device)
        pos = (torch.arange(b, device=device) + shift) % b
        donors = torch.empty_like(perm)
        donors.scatter_(1, perm, perm.gather(1, pos))
        return donors
    if kind == "different_label":
        weights = (targets[:, None] != targets[None, :]).float()
        empty = weights.sum(1) == 0
        if bool(empty.any()):
            fallback = 1.0 - torch.eye(b, device=device)
            if b == 1:
                fallback = torch.ones(1, 1, device=device)
            weights[empty] = fallback[empty]
        return torch.multinomial(weights, k, replacement=True, generator=generator).T
    raise ConfigError(f"unknown permutation kind {kind!r}")


def subsets(modalities: tuple[str, ...], which: str) -> list[tuple[str, ...]]:
    """Permuted sets ``S``: all non-empty proper subsets, or singletons plus leave-one-out."""
    m = len(modalities)
    if which == "all":
        sizes = range(1, m)
        return [s for r in sizes for s in itertools.combinations(modalities, r)]
    out = [(x,) for x in modalities]
    out += [tuple(x for x in modalities if x != left) for left in modalities]
    seen: list[tuple[str, ...]] = []
    for s in out:
        if s not in seen:
            seen.append(s)
    return seen


def game_weights(
    modalities: tuple[str, ...], sets: list[tuple[str, ...]], strategy: str, lam: float
) -> list[tuple[tuple[str, ...], str | None, float]]:
    """``(S, j, w)`` terms of R_MIPD = ``sum w * D(y_hat_{S->j}, y_hat_ref)``.

    ``j`` is the one modality whose latent keeps its gradient (``None``: no mask). Weight ``-lam``
    when ``j`` is in ``S``, ``-k * lam`` otherwise; zero-weight terms are dropped, and the
    collaborative game (``k = 1``) uses one unmasked term per ``S``.
    """
    if strategy == "collaborative":
        return [(s, None, -lam) for s in sets]
    k = STRATEGY_K[strategy]
    terms = []
    for s in sets:
        for j in modalities:
            w = -lam if j in s else -k * lam
            if w != 0.0:
                terms.append((s, j, w))
    return terms


# --- the method -----------------------------------------------------------------------------------
@dataclass
class MCRParams:
    """Options of MCR (names follow the paper; the reference code's names in brackets).

    Attributes:
        lam: lambda_M, the weight of R_MIPD (``l``). Large values (about 5 and more) can make
            SGD diverge as the game maximises divergences; clip gradients (``train.grad_clip``).
        strategy: the game: greedy (k = -1), independent (k = 0), collaborative (k = +1).
        num_permutations: K perturbed copies of the batch per step (``num_samples``).
        permutation: uniform, derangement (no fixed points) or different_label donors.
        subsets: ``all`` non-empty proper subsets (2^M - 2), or ``linear``: singletons and
            leave-one-out sets only (2M, cost linear in M; identical to ``all`` for M <= 3).
        perturbation: permute (MCR), latent_noise, latent_zero, input_noise, input_zero.
        detach_reference: stop the gradient into the unperturbed reference prediction.
        lam_uni: weight of each unimodal head's loss (``multil``).
        lam_con: weight of L_Con (``contr_coeff``).
        temperature: NT-Xent temperature tau.
        contrastive: ``supervised`` (same-label positives) or ``pure`` (same-sample positives).
        lam_ceb: weight of L_CEB (``lib``); 0 disables it and creates no head.
        ceb_input: ``label`` (the paper's h(y)) or ``logits`` (the detached fused logits).
        ceb_hidden: hidden width of the CEB head (default: the largest latent size).
    """

    lam: float = 0.1
    strategy: Strategy = "greedy"
    num_permutations: int = 32
    permutation: Literal["uniform", "derangement", "different_label"] = "uniform"
    subsets: Literal["all", "linear"] = "all"
    perturbation: Literal["permute", "latent_noise", "latent_zero", "input_noise", "input_zero"] = (
        "permute"
    )
    detach_reference: bool = False
    lam_uni: float = 1.0
    lam_con: float = 1.0
    temperature: float = 0.5
    contrastive: Literal["supervised", "pure"] = "supervised"
    lam_ceb: float = 0.0
    ceb_input: Literal["label", "logits"] = "label"
    ceb_hidden: int | None = None

    def __post_init__(self) -> None:
        check(self.lam >= 0, f"method.lam must be >= 0, got {self.lam}")
        check(
            self.num_permutations >= 1,
            f"method.num_permutations must be >= 1, got {self.num_permutations}",
        )
        check(self.lam_uni >= 0, f"method.lam_uni must be >= 0, got {self.lam_uni}")
        check(self.lam_con >= 0, f"method.lam_con must be >= 0, got {self.lam_con}")
        check(self.temperature > 0, f"method.temperature must be > 0, got {self.temperature}")
        check(self.lam_ceb >= 0, f"method.lam_ceb must be >= 0, got {self.lam_ceb}")
        check(
            self.ceb_hidden is None or self.ceb_hidden >= 1,
            f"method.ceb_hidden must be >= 1 or null, got {self.ceb_hidden}",
        )


class CEBHead(nn.Module):
    """``h``: Linear(C -> hidden, no bias), ReLU, Linear(hidden -> sum_m d_m, no bias)."""

    def __init__(self, num_inputs: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_inputs, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, out_dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@METHODS.register("mcr")
class MCR(Method):
    """Task + unimodal losses + game-weighted MIPD + supervised contrastive + CEB."""

    name = "mcr"
    Params = MCRParams
    needs_unimodal_heads = True

    def __init__(self, params: MCRParams | None = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.ceb: CEBHead | None = None

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        p: MCRParams = self.params
        if p.lam_con > 0 and len(set(info.latent_dims.values())) != 1:
            raise ConfigError(
                f"method.lam_con > 0 needs equal latent sizes, got {info.latent_dims}"
            )
        if p.lam_ceb > 0:
            out_dim = sum(info.latent_dims.values())
            hidden = p.ceb_hidden or max(info.latent_dims.values())
            self.ceb = CEBHead(info.num_outputs, hidden, out_dim)
            return self.ceb
        return None

    # --- losses --------------------------------------------------------------------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        p: MCRParams = self.params
        out = {"task": ctx.task_loss(output.logits)} | unimodal_losses(output, ctx, p.lam_uni)
        if p.lam > 0:
            out["mipd"] = self.mipd(output, ctx)
        if p.lam_con > 0:
            out["con"] = p.lam_con * self.contrastive_loss(output, ctx)
        if p.lam_ceb > 0:
            out["ceb"] = p.lam_ceb * self.ceb_loss(output, ctx)
        return out

    def contrastive_loss(self, output: ModelOutput, ctx: StepContext) -> Tensor:
        """L_Con. For regression, positives share the sign of the target (``y >= 0`` or not)."""
        p: MCRParams = self.params
        y = ctx.targets
        if p.contrastive == "pure":
            labels = torch.arange(y.shape[0], device=y.device)
        elif ctx.task == "regression":
            labels = (y >= 0).long()
        else:
            labels = y
        return nt_xent(output.latents, labels, p.temperature)

    def ceb_loss(self, output: ModelOutput, ctx: StepContext) -> Tensor:
        """L_CEB = MSE(h(input), concat(z)), the latents not detached."""
        if self.ceb is None:
            raise ConfigError("mcr's CEB head is missing: call setup() before training")
        if self.params.ceb_input == "logits":
            source = output.logits.detach()
        elif ctx.task == "classification":
            source = F.one_hot(ctx.targets, output.logits.shape[1]).to(output.logits.dtype)
        else:
            source = ctx.targets.to(output.logits.dtype)[:, None]
        target = torch.cat([output.latents[m] for m in output.modalities], dim=1)
        return F.mse_loss(self.ceb(source), target)

    # --- R_MIPD --------------------------------------------------------------------------------
    def sample_donors(self, targets: Tensor, modalities: tuple[str, ...]) -> dict[str, Tensor]:
        """Independent ``(K, B)`` donors per modality, from a generator seeded by the global RNG.

        Seeding from the global torch RNG keeps runs reproducible and resumes exact (the trainer
        saves and restores that RNG), while the permutations draw nothing else from it.
        """
        p: MCRParams = self.params
        seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator(device=targets.device).manual_seed(seed)
        return {m: draw_donors(targets, p.num_permutations, p.permutation, gen) for m in modalities}

    def _perturbed(
        self, output: ModelOutput, ctx: StepContext, donors: Mapping[str, Tensor] | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
        """Anchor and perturbed per-modality tensors of ``R * B`` rows, and ``R``.

        The tensors are contributions for additive heads and latents otherwise.
        """
        p: MCRParams = self.params
        mods = output.modalities
        additive = output.contributions is not None
        base = output.contributions if additive else output.latents
        assert base is not None
        if p.perturbation == "permute":
            if donors is None:
                donors = self.sample_donors(ctx.targets, mods)
            reps = next(iter(donors.values())).shape[0]
            anchor = {m: base[m].repeat(reps, 1) for m in mods}
            perturbed = {m: base[m][donors[m].reshape(-1)] for m in mods}
            return anchor, perturbed, reps
        reps = p.num_permutations if p.perturbation.endswith("noise") else 1
        anchor = {m: base[m].repeat(reps, 1) for m in mods}
        if p.perturbation.startswith("latent"):
            z = output.latents
            if p.perturbation == "latent_noise":
                noisy = {
                    m: z[m].repeat(reps, 1) + torch.randn_like(z[m].repeat(reps, 1)) * _std(z[m])
                    for m in mods
                }
            else:
                noisy = {m: torch.zeros_like(z[m]) for m in mods}
        else:
            if ctx.encode is None or ctx.inputs is None:
                raise ConfigError(
                    f"mcr perturbation={p.perturbation!r} needs ctx.encode and inputs"
                )
            x = ctx.inputs
            if p.perturbation == "input_noise":
                xin = {
                    m: x[m].repeat(reps, *([1] * (x[m].dim() - 1)))
                    + torch.randn((reps * x[m].shape[0], *x[m].shape[1:]), device=x[m].device)
                    * _std(x[m])
                    for m in x
                }
            else:
                xin = {m: torch.zeros_like(x[m]) for m in x}
            noisy = ctx.encode(xin)
        if additive:
            noisy = self._head(ctx).contributions(noisy)
        return anchor, {m: noisy[m] for m in mods}, reps

    def _head(self, ctx: StepContext) -> nn.Module:
        if ctx.fusion is None:
            raise ConfigError("mcr needs ctx.fusion (the fusion head) when method.lam > 0")
        return ctx.fusion  # type: ignore[return-value]

    def mipd(
        self,
        output: ModelOutput,
        ctx: StepContext,
        donors: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """R_MIPD, whose gradient realises the game of :attr:`MCRParams.strategy`.

        ``donors`` (``(K, B)`` per modality) fixes the permutations; by default they are drawn.
        """
        p: MCRParams = self.params
        head = self._head(ctx)
        mods = output.modalities
        additive = output.contributions is not None
        anchor, perturbed, reps = self._perturbed(output, ctx, donors)
        ref = output.logits.detach() if p.detach_reference else output.logits
        ref = ref.repeat(reps, 1)
        terms = game_weights(mods, subsets(mods, p.subsets), p.strategy, p.lam)
        logits = []
        for s, j, _ in terms:
            parts = {m: (perturbed[m] if m in s else anchor[m]) for m in mods}
            if additive:
                if j is not None:
                    parts = {m: (v if m == j else v.detach()) for m, v in parts.items()}
                logits.append(head.combine(parts))
            else:
                stop = () if j is None else tuple(m for m in mods if m != j)
                logits.append(head(parts, stop).logits)
        n_terms = len(terms)
        rows = divergence_rows(torch.cat(logits), ref.repeat(n_terms, 1), ctx.task)
        per_term = rows.reshape(n_terms, -1).mean(1)
        weights = torch.tensor([w for _, _, w in terms], dtype=per_term.dtype, device=rows.device)
        with torch.no_grad():
            for (s, _, _), value in zip(terms, per_term, strict=True):
                if len(s) == 1:
                    ctx.log(f"mcr_div_{s[0]}", value)
        return (weights * per_term).sum()


def _std(x: Tensor) -> Tensor:
    """Per-feature standard deviation over the batch (zero for a batch of one), no gradient."""
    if x.shape[0] < 2:
        return torch.zeros_like(x[:1])
    return x.detach().std(dim=0, keepdim=True)
