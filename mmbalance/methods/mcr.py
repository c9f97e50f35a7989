"""MCR: the Multimodal Competition Regularizer (arXiv 2411.07335).

The loss is ``L = task + lam_uni * sum_m CE(unimodal_m) + R_MIPD + lam_con * L_Con + lam_ceb *
L_CEB``:

- **R_MIPD** (unique information). For a non-empty proper subset ``S`` of the modalities,
  ``L_S = -D_S`` with ``D_S = D(y_hat_S, y_ref)``: the divergence between the prediction with the
  latents of ``S`` perturbed and the unperturbed reference prediction ``y_ref`` (the fused logits
  of the step). ``D`` is the Jensen-Shannon divergence of the softmax predictions (MSE for
  regression), averaged over the rows; the perturbation is by default a within-batch
  permutation, drawn ``K`` times per step. The game strategy with coefficient ``k`` (greedy -1,
  independent 0, collaborative +1) is the rule that encoder ``j`` descends
  ``lam * (sum_{S contains j} L_S + k * sum_{S without j} L_S)``. Each set's *input weight*
  ``w(S, m) = -lam`` if ``m`` is in ``S`` and ``-k * lam`` otherwise is the factor with which
  modality ``m``'s input to the perturbed prediction of ``S`` receives ``dD_S``.

  What the other tensors receive is a convention, the reference code's unless
  :attr:`MCRParams.reference` says otherwise. The reference code realises the game with
  stop-gradient masks: the term ``(S, j)`` evaluates the head with every modality but ``j``
  detached and carries weight ``w(S, j)``, and the collaborative game is one unmasked term
  ``-lam * D_S`` per set. So what is not masked receives the *set weight*
  ``W_S = sum_j w(S, j)`` (greedy, independent; ``-lam * (|S| + k (M - |S|))``) or ``-lam``
  (collaborative) times its derivative of ``D_S``: the head's shared parameters (the shared bias
  of an additive head, every parameter of any other head) and, with ``reference="summed"``
  (the default; the reference code's CREMA-D, AVE and 3-modality models), the reference
  prediction ``y_ref``,
  through which the encoders then receive ``W_S`` times their reference-path derivative, not
  ``w(S, j)``. The value of the term is ``sum_S W_S D_S``: for greedy play with two modalities
  ``W_S = 0``, so the logged ``train_mipd`` is exactly 0 although the gradient is not (the
  divergences themselves are logged per step as ``mcr_div_<m>``; see :meth:`MCR.mipd`), and
  neither ``y_ref`` nor the shared bias receives any gradient. ``reference="masked"`` routes the
  reference path through the same masks, so that encoder ``j`` receives exactly
  ``lam * (sum_{S contains j} grad_j L_S + k * sum_{S without j} grad_j L_S)`` with ``grad_j``
  over both the perturbed and the reference path: the game as defined.
  ``reference="detached"`` stops the gradient into ``y_ref`` (the reference code's
  Something-Something model).

  Two evaluations give the same gradients (to rounding): ``per_mask`` (the reference code's
  one head evaluation and one divergence per term ``(S, j)``) and ``per_set``, the default. For a
  fixed ``S`` every masked term has the same forward value, so ``per_set`` evaluates the head and
  the divergence once per set and realises the masks in the backward pass: each modality's input
  gradient is multiplied by ``w(S, m)``, the shared parameters' and the reference's by ``W_S``.
  That divides the divergence and head work by ``M`` (greedy, independent).
- **L_Con** (shared information): supervised NT-Xent over the L2-normalised latents of all
  modalities; positives are same-label pairs within and across modalities.
- **L_CEB** (task-irrelevant shared information): a small head reconstructs the concatenated
  latents from the label (the paper) or from the detached fused logits (the reference code).

Permuting in latent space is what makes MCR cheap: for additive heads (``late_sum``,
``concat_linear``) the per-modality logit contributions are permuted and recombined, so the extra
cost is a gather and a sum over ``K * B`` rows of ``C`` logits per set; other heads are
re-evaluated on ``K * B`` rows per set, in one call for all sets (two when greedy play with an
even number of modalities has sets with ``W_S = 0``). Neither re-runs an encoder.

Where the pieces live: this module is the method (its options, its loss terms, its steps);
:mod:`mmbalance.methods.ops.mcr_game` holds the sets, the donors, the game's weights and their
routing through the backward pass, :mod:`mmbalance.methods.ops.divergence` the divergences
(computed class-major with a hand-written backward pass on CPU, where that is several times
faster) and :mod:`mmbalance.methods.ops.contrastive` the NT-Xent loss.

Distributed training: every process permutes within its own share of the global batch, and the
contrastive loss pairs rows within that share too; the gradients are then averaged as usual. So
``N`` processes at global batch ``B`` train like one process at batch ``B`` whose permutation
donors and contrastive pairs are restricted to blocks of ``B / N`` rows, not like one process at
batch ``B`` (``tests/test_mcr.py::test_ddp_equals_per_shard_mcr``): each row's donors and
contrastive negatives come from ``B / N - 1`` other rows instead of ``B - 1``, so metrics differ
from a single-process run at the same global batch.

Unimodal pre-training initialisation (``--pre`` in the paper) is the trainer's
``train.unimodal_pretrain_epochs``: with it > 0, each encoder and its unimodal head start from a
unimodal run of that many epochs.

Three known faults of the reference release are avoided here by construction: the regularizer is
part of the returned loss, the strategy option selects the weights, and every modality (not only
the last) is detached in the masked evaluations for any number of modalities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    unimodal_losses,
)
from mmbalance.methods.ops.contrastive import nt_xent
from mmbalance.methods.ops.divergence import divergence_rows, set_divergences
from mmbalance.methods.ops.mcr_game import (
    AdditiveMIPD,
    AdditiveSpec,
    Perturbation,
    RoutingTensors,
    SetRouting,
    Strategy,
    draw_donors,
    game_weights,
    head_set_logits,
    set_routing,
    subsets,
)
from mmbalance.methods.ops.precision import compute_dtype
from mmbalance.models.output import ModelOutput


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
        reference: how the unperturbed reference prediction receives gradient (module
            docstring): ``summed`` (the reference code: each set's weight ``W_S``), ``masked``
            (through the same masks as the perturbed prediction: the game as defined) or
            ``detached`` (none).
        evaluation: ``per_set`` (one head evaluation and one divergence per permuted set, the
            masks realised in the backward pass) or ``per_mask`` (the reference code's one per
            set and unmasked modality); the same gradients to rounding, ``per_set`` is cheaper.
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
    reference: Literal["summed", "masked", "detached"] = "summed"
    evaluation: Literal["per_set", "per_mask"] = "per_set"
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
    search_space = ("method.lam", (0.01, 0.1, 1.0))

    def __init__(self, params: MCRParams | None = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.ceb: CEBHead | None = None
        self._routing_cache: dict[Any, tuple[SetRouting, RoutingTensors]] = {}

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
        classes: int | None = None
        if p.contrastive == "pure":
            labels = torch.arange(y.shape[0], device=y.device)
        elif ctx.task == "regression":
            labels, classes = (y >= 0).long(), 2
        else:
            labels, classes = y, output.logits.shape[1]
        return nt_xent(output.latents, labels, p.temperature, classes)

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
        saves and restores that RNG), while the permutations draw nothing else from it. The
        ``M * K`` permutations are drawn in one call and split by modality.
        """
        drawn = self._draw_donor_stack(targets, len(modalities))
        return {m: drawn[i] for i, m in enumerate(modalities)}

    @torch.compiler.disable
    def _draw_donor_stack(self, targets: Tensor, count: int) -> Tensor:
        """``(count, K, B)`` donors, drawn as :meth:`sample_donors` describes (eagerly in a
        compiled step: the draw reads its seed on the host; one graph break instead of several)."""
        p: MCRParams = self.params
        seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator(device=targets.device).manual_seed(seed)
        k = p.num_permutations
        drawn = draw_donors(targets, count * k, p.permutation, gen)
        return drawn.reshape(count, k, targets.shape[0])

    def perturbation(
        self, output: ModelOutput, ctx: StepContext, donors: Mapping[str, Tensor] | None
    ) -> Perturbation:
        """This step's perturbed copies: of the contributions for additive heads, of the latents
        otherwise (permutations as indices, which apply to either)."""
        p: MCRParams = self.params
        mods = output.modalities
        if p.perturbation == "permute":
            if donors is None:
                stack = self._draw_donor_stack(ctx.targets, len(mods))
            else:
                stack = torch.stack([donors[m] for m in mods])
            index = stack.view(len(mods), -1)
            return Perturbation(
                stack.shape[1],
                index={m: index[i] for i, m in enumerate(mods)},
                index_stack=index,
            )
        reps = p.num_permutations if p.perturbation.endswith("noise") else 1
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
        if output.contributions is not None:
            noisy = self._head(ctx).contributions(noisy)
        return Perturbation(reps, values={m: noisy[m] for m in mods})

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
        Its value is ``sum_S W_S D_S`` (0 for greedy play with two modalities, module docstring);
        the divergences themselves are logged with :meth:`StepContext.log`:
        ``mcr_div_<m>`` (``D_S`` of the set ``{m}``) and, with more than two modalities,
        ``mcr_div_mean`` (the mean over all permuted sets).
        """
        perturbation = self.perturbation(output, ctx, donors)
        if self.params.evaluation == "per_mask":
            sets, per_set, value = self._mipd_per_mask(output, ctx, perturbation)
        else:
            sets, per_set, value = self._mipd_per_set(output, ctx, perturbation)
        self._log_divergences(ctx, sets, per_set)
        return value

    @staticmethod
    def _log_divergences(
        ctx: StepContext, sets: Sequence[tuple[str, ...]], per_set: Tensor
    ) -> None:
        values = per_set.detach().unbind()
        for s, value in zip(sets, values, strict=True):
            if len(s) == 1:
                ctx.log(f"mcr_div_{s[0]}", value)
        if len({m for s in sets for m in s}) > 2:
            ctx.log("mcr_div_mean", per_set.detach().mean())

    def routing(
        self, modalities: tuple[str, ...], device: torch.device, dtype: torch.dtype
    ) -> tuple[SetRouting, RoutingTensors]:
        """The game's :class:`SetRouting` and its tensors (cached per modalities, device, dtype)."""
        key = (modalities, device, dtype)
        if key not in self._routing_cache:
            p: MCRParams = self.params
            routing = set_routing(modalities, subsets(modalities, p.subsets), p.strategy, p.lam)
            self._routing_cache[key] = (routing, RoutingTensors.of(routing, dtype, device))
        return self._routing_cache[key]

    def _mipd_per_set(
        self, output: ModelOutput, ctx: StepContext, perturbation: Perturbation
    ) -> tuple[Sequence[tuple[str, ...]], Tensor, Tensor]:
        """One head evaluation and one divergence per permuted set (module docstring)."""
        p: MCRParams = self.params
        head = self._head(ctx)
        mods = output.modalities
        ref = output.logits
        if p.reference == "detached":
            ref = ref.detach()
        routing, w = self.routing(mods, ref.device, compute_dtype(ref))
        silent = not any(routing.shared)
        if output.contributions is not None:
            contributions = [output.contributions[m] for m in mods]
            index = perturbed = None
            if perturbation.index_stack is not None:
                index = perturbation.index_stack  # (M, R * B)
            else:
                assert perturbation.values is not None
                b, c = ref.shape
                stacked = torch.stack([perturbation.values[m] for m in mods])  # (M, R * B, C)
                perturbed = stacked.transpose(1, 2).reshape(len(mods), c, perturbation.rows, b)
            spec = AdditiveSpec(w, ctx.task == "regression", p.reference, silent)
            bias = getattr(head, "bias", None)
            value, per_set = AdditiveMIPD.apply(spec, index, perturbed, bias, ref, *contributions)
            return routing.sets, per_set, value
        latents = output.latents
        r = perturbation.rows
        b, c = ref.shape
        moved = {m: perturbation.take(m, latents[m]) for m in mods}
        u, v, order, w_u_list, w_v_list = head_set_logits(
            head, latents, moved, r, routing, p.reference == "masked"
        )
        dev, dt = w.shared.device, w.shared.dtype
        w_value = torch.tensor([routing.shared[i] for i in order], dtype=dt, device=dev)
        w_u = torch.tensor(w_u_list, dtype=dt, device=dev)
        if v is None:
            v, w_v = ref.T.reshape(1, c, 1, b), w_value
        else:
            w_v, silent = torch.tensor(w_v_list, dtype=dt, device=dev), False
        value, per_set = set_divergences(u, v, w_u, w_v, w_value, ctx.task, v_silent=silent)
        return [routing.sets[i] for i in order], per_set, value

    def _mipd_per_mask(
        self, output: ModelOutput, ctx: StepContext, perturbation: Perturbation
    ) -> tuple[Sequence[tuple[str, ...]], Tensor, Tensor]:
        """The reference code's evaluation: one head evaluation per term ``(S, j)``."""
        p: MCRParams = self.params
        head = self._head(ctx)
        mods = output.modalities
        additive = output.contributions is not None
        base = output.contributions if additive else output.latents
        assert base is not None
        reps = perturbation.rows
        anchor = {m: base[m].repeat(reps, 1) for m in mods}
        perturbed = {m: perturbation.take(m, base[m]) for m in mods}
        sets = subsets(mods, p.subsets)
        terms = game_weights(mods, sets, p.strategy, p.lam)
        logits, refs = [], []
        for s, j, _ in terms:
            parts = {m: (perturbed[m] if m in s else anchor[m]) for m in mods}
            stop = () if j is None else tuple(m for m in mods if m != j)
            if additive:
                parts = {m: (v.detach() if m in stop else v) for m, v in parts.items()}
                logits.append(head.combine(parts))
            else:
                logits.append(head(parts, stop).logits)
            if p.reference == "masked" and j is not None:
                refs.append(self._masked_reference(head, base, stop, additive).repeat(reps, 1))
            elif p.reference == "detached":
                refs.append(output.logits.detach().repeat(reps, 1))
            else:
                refs.append(output.logits.repeat(reps, 1))
        n_terms = len(terms)
        rows = divergence_rows(torch.cat(logits), torch.cat(refs), ctx.task)
        per_term = rows.reshape(n_terms, -1).mean(1)
        weights = torch.tensor([w for _, _, w in terms], dtype=per_term.dtype, device=rows.device)
        first = {}
        for i, (s, _, _) in enumerate(terms):
            first.setdefault(s, i)
        per_set = per_term.detach()[torch.tensor(list(first.values()), device=rows.device)]
        return list(first), per_set, (weights * per_term).sum()

    @staticmethod
    def _masked_reference(
        head: nn.Module, base: Mapping[str, Tensor], stop: tuple[str, ...], additive: bool
    ) -> Tensor:
        """The unperturbed prediction with the modalities in ``stop`` detached."""
        if additive:
            return head.combine({m: (v.detach() if m in stop else v) for m, v in base.items()})
        return head(dict(base), stop).logits


def _std(x: Tensor) -> Tensor:
    """Per-feature standard deviation over the batch (zero for a batch of one), no gradient."""
    if x.shape[0] < 2:
        return torch.zeros_like(x[:1])
    return x.detach().std(dim=0, keepdim=True)
