"""Fusion heads: map per-modality latents to fused predictions.

Every head can be called on *any* latents (permuted, masked, zeroed, noised), because balancing
methods re-evaluate it, and takes ``stop_grad``: the modalities whose latents (and, for additive
heads, whose own head weights) must receive no gradient from this evaluation. Forward values never
depend on ``stop_grad``; only gradient routing does.

Additive heads (:attr:`FusionHead.additive`) also expose per-modality contributions and
:meth:`FusionHead.combine`, so methods can perturb a modality's ``(N, C)`` contribution instead of
re-running the head on ``(N, d)`` latents.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, DataError, shown
from mmbalance.models import FUSION_HEADS
from mmbalance.models.output import FusionOutput


class FusionHead(nn.Module):
    """Base class. Subclasses implement :meth:`fuse`; :meth:`forward` handles checks and masking."""

    additive: ClassVar[bool] = False
    max_modalities: ClassVar[int | None] = None
    #: the head needs every latent to have the same size (one head shared by all modalities)
    equal_latent_dims: ClassVar[bool] = False

    def __init__(self, latent_dims: Mapping[str, int], num_outputs: int) -> None:
        super().__init__()
        if len(latent_dims) < 2:
            raise ConfigError(f"a fusion head needs at least 2 modalities, got {list(latent_dims)}")
        if self.max_modalities is not None and len(latent_dims) > self.max_modalities:
            raise ConfigError(
                f"fusion head {type(self).__name__} supports at most {self.max_modalities} modalities"
            )
        if self.equal_latent_dims and len(set(latent_dims.values())) > 1:
            raise ConfigError(
                f"fusion head {type(self).__name__} needs equal latent sizes, got {dict(latent_dims)}"
            )
        self.modalities: tuple[str, ...] = tuple(latent_dims)
        self.latent_dims = dict(latent_dims)
        self.num_outputs = num_outputs

    def forward(
        self, latents: Mapping[str, Tensor], stop_grad: Collection[str] = ()
    ) -> FusionOutput:
        self._check(latents, stop_grad)
        if self.additive:
            contributions = self.contributions(latents)
            masked = {m: (c.detach() if m in stop_grad else c) for m, c in contributions.items()}
            return FusionOutput(self.combine(masked), contributions)
        inputs = {
            m: (latents[m].detach() if m in stop_grad else latents[m]) for m in self.modalities
        }
        return FusionOutput(self.fuse(inputs), None)

    def _check(self, latents: Mapping[str, Tensor], stop_grad: Collection[str]) -> None:
        if set(latents) != set(self.modalities):
            raise DataError(
                f"fusion head expects modalities {list(self.modalities)}, got {list(latents)}"
            )
        unknown = set(stop_grad) - set(self.modalities)
        if unknown:
            raise ConfigError(f"stop_grad names unknown modalities {sorted(unknown)}")
        for m in self.modalities:
            z = latents[m]
            if z.dim() != 2 or z.shape[1] != self.latent_dims[m]:
                raise DataError(
                    f"latent of modality {m!r} has shape {tuple(z.shape)}, "
                    f"expected (N, {self.latent_dims[m]})"
                )

    # --- to implement -------------------------------------------------------------------------
    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover - abstract
        """Non-additive heads: fused logits from (already masked) latents."""
        raise NotImplementedError

    def contributions(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Additive heads: each modality's bias-free logit contribution."""
        raise NotImplementedError(f"{type(self).__name__} is not additive")

    def combine(self, contributions: Mapping[str, Tensor]) -> Tensor:
        """Additive heads: logits from contributions (sum plus the shared bias)."""
        raise NotImplementedError(f"{type(self).__name__} is not additive")

    @property
    def bias(self) -> Tensor | None:
        """The shared bias of an additive head."""
        return None


@FUSION_HEADS.register("late_sum")
class LateSumFusion(FusionHead):
    """``logits = sum_m z_m W_m^T + b``: one bias-free linear map per modality, one shared bias.

    The contributions ``z_m W_m^T`` are exactly each modality's additive share of the logits, which
    is what OGM-GE's discrepancy score and MCR's cheap permutation use.
    """

    additive = True

    def __init__(self, latent_dims: Mapping[str, int], num_outputs: int) -> None:
        super().__init__(latent_dims, num_outputs)
        self.linears = nn.ModuleDict(
            {m: nn.Linear(d, num_outputs, bias=False) for m, d in latent_dims.items()}
        )
        self.shared_bias = nn.Parameter(torch.zeros(num_outputs))

    def contributions(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.linears[m](latents[m]) for m in self.modalities}

    def combine(self, contributions: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([contributions[m] for m in self.modalities]).sum(0) + self.shared_bias

    @property
    def bias(self) -> Tensor:
        return self.shared_bias


@FUSION_HEADS.register("concat_linear")
class ConcatLinearFusion(FusionHead):
    """``logits = W [z_1; ...; z_M] + b`` (OGM-GE's concat head).

    Mathematically additive: modality m's contribution is ``z_m W[:, slice_m]^T``.
    """

    additive = True

    def __init__(self, latent_dims: Mapping[str, int], num_outputs: int) -> None:
        super().__init__(latent_dims, num_outputs)
        self.linear = nn.Linear(sum(latent_dims.values()), num_outputs)
        bounds, start = {}, 0
        for m, d in latent_dims.items():
            bounds[m] = (start, start + d)
            start += d
        self._slices = bounds

    def contributions(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for m in self.modalities:
            lo, hi = self._slices[m]
            out[m] = latents[m] @ self.linear.weight[:, lo:hi].T
        return out

    def combine(self, contributions: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([contributions[m] for m in self.modalities]).sum(0) + self.linear.bias

    @property
    def bias(self) -> Tensor:
        return self.linear.bias


@FUSION_HEADS.register("concat_mlp")
class ConcatMLPFusion(FusionHead):
    """Concatenated latents through an MLP (``hidden`` units, ReLU, dropout).

    Args:
        hidden: width of the hidden layers.
        layers: linear layers, the output layer included (1: a linear head).
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        latent_dims: Mapping[str, int],
        num_outputs: int,
        hidden: int = 128,
        layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(latent_dims, num_outputs)
        if layers < 1:
            raise ConfigError(f"concat_mlp layers must be >= 1, got {layers}")
        dims = [sum(latent_dims.values())] + [hidden] * (layers - 1)
        blocks: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            blocks += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        blocks.append(nn.Linear(dims[-1], num_outputs))
        self.mlp = nn.Sequential(*blocks)

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        return self.mlp(torch.cat([latents[m] for m in self.modalities], dim=-1))


def _split_target(latent_dims: Mapping[str, int], target: str | None) -> tuple[str, list[str]]:
    modalities = list(latent_dims)
    target = modalities[-1] if target is None else target
    if target not in latent_dims:
        raise ConfigError(f"target modality {target!r} is not one of {modalities}")
    return target, [m for m in modalities if m != target]


@FUSION_HEADS.register("film")
class FiLMFusion(FusionHead):
    """FiLM: the other modalities produce ``(gamma, beta)`` that modulate the ``target`` latent.

    ``logits = W_out (gamma * z_target + beta) + b``, with ``[gamma, beta] = W_c [z_others]``.
    ``target`` defaults to the last modality (with two modalities the first conditions the
    second, as in OGM-GE's FiLM with audio conditioning visual).

    Args:
        target: the modality whose latent is modulated (null: the last modality); the others
            condition it.
    """

    def __init__(
        self, latent_dims: Mapping[str, int], num_outputs: int, target: str | None = None
    ) -> None:
        super().__init__(latent_dims, num_outputs)
        self.target, self.conditioners = _split_target(latent_dims, target)
        d = latent_dims[self.target]
        self.film = nn.Linear(sum(latent_dims[m] for m in self.conditioners), 2 * d)
        self.out = nn.Linear(d, num_outputs)

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        cond = torch.cat([latents[m] for m in self.conditioners], dim=-1)
        gamma, beta = self.film(cond).chunk(2, dim=-1)
        return self.out(gamma * latents[self.target] + beta)


@FUSION_HEADS.register("gated")
class GatedFusion(FusionHead):
    """Gated fusion: ``logits = W_out(sigmoid(W_g [z_others]) * W_t z_target)``.

    Args:
        target: the modality whose projected latent is gated (null: the last modality); the
            others compute the gate.
        hidden: width of the gate and of the projected target latent.
    """

    def __init__(
        self,
        latent_dims: Mapping[str, int],
        num_outputs: int,
        target: str | None = None,
        hidden: int = 128,
    ) -> None:
        super().__init__(latent_dims, num_outputs)
        self.target, self.conditioners = _split_target(latent_dims, target)
        self.gate = nn.Linear(sum(latent_dims[m] for m in self.conditioners), hidden)
        self.value = nn.Linear(latent_dims[self.target], hidden)
        self.out = nn.Linear(hidden, num_outputs)

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        cond = torch.cat([latents[m] for m in self.conditioners], dim=-1)
        return self.out(torch.sigmoid(self.gate(cond)) * self.value(latents[self.target]))


@FUSION_HEADS.register("transformer")
class TransformerFusion(FusionHead):
    """A small transformer over one token per modality plus a learned CLS token.

    Each latent is projected to ``d_model`` and tagged with a learned modality embedding; the CLS
    output is classified.

    Args:
        d_model: width of the tokens.
        heads: attention heads (must divide d_model).
        layers: transformer layers.
        dropout: dropout inside the transformer layers.
    """

    def __init__(
        self,
        latent_dims: Mapping[str, int],
        num_outputs: int,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(latent_dims, num_outputs)
        if d_model % heads:
            raise ConfigError(f"transformer d_model={d_model} is not divisible by heads={heads}")
        self.project = nn.ModuleDict({m: nn.Linear(d, d_model) for m, d in latent_dims.items()})
        self.modality_embedding = nn.Parameter(torch.randn(len(latent_dims), d_model) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, num_outputs)

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        tokens = torch.stack([self.project[m](latents[m]) for m in self.modalities], dim=1)
        tokens = tokens + self.modality_embedding
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        return self.out(self.encoder(torch.cat([cls, tokens], dim=1))[:, 0])


def build_fusion(
    name: str, latent_dims: Mapping[str, int], num_outputs: int, params: Mapping[str, object]
) -> FusionHead:
    """Build a registered fusion head, turning bad keyword arguments into one-line errors."""
    cls = FUSION_HEADS.get(name)
    try:
        return cls(latent_dims, num_outputs, **params)
    except TypeError as err:
        raise ConfigError(f"fusion head {name!r}: {err}") from None
    except (ValueError, ZeroDivisionError, OverflowError, RuntimeError, IndexError) as err:
        # an option out of the range the head can be built with (heads=0, a negative size)
        raise ConfigError(
            f"fusion head {name!r} cannot be built with the options {shown(dict(params), 80)} "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:80]})"
        ) from None
