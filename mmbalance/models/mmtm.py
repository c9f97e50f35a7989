"""Cross-modal bottleneck blocks between the stages of ResNet-18 encoders.

:class:`MMTM` is the multimodal transfer module (Joze et al., CVPR 2020) for any number of
modalities, as Greedy (Wu et al., ICML 2022) places it after ResNet stages: each modality's
feature map is squeezed to its channel means, the squeezes of all modalities are concatenated
and passed through one bottleneck (``int(2 * sum C / ratio)`` units, ReLU), and each modality
gets its own sigmoid excitation that rescales its channels::

    s_m = mean over frames and space of x_m              (B, C_m)
    e   = relu(W_s [s_1; ...; s_M] + b_s)
    g_m = sigmoid(W_m e + b_m)                           (B, C_m)
    x_m <- x_m * g_m

The block also keeps, per modality, the running mean of ``g_m`` over the training forwards
(a cumulative mean of the batch means, as in the Greedy code). Greedy's *curation* replaces one
modality's ``g_m`` by that running mean, which cuts the other modalities' per-sample information
out of that modality's branch.

:func:`staged_forward` runs :class:`~mmbalance.models.encoders.ResNet18Encoder` encoders stage
by stage with such blocks after chosen stages; with every gate equal to 1 it computes exactly
what the encoders compute alone (same frame folding and pooling).

After the last stage a block is the same thing on the pooled latents: a per-channel gate commutes
with the spatial (and frame) mean, and the squeeze of the stage-4 map *is* the pooled latent. So
:func:`latent_forward` applies the stage-4 block to the latents of encoders of any kind (MLPs,
transformers), which have no stages to put the other blocks between.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, DataError
from mmbalance.models.encoders import ResNet18Encoder

#: Stages of ResNet-18 (1-based) and their width multipliers.
RESNET_STAGES = (1, 2, 3, 4)


def stage_channels(latent_dim: int, stage: int) -> int:
    """Channels after ResNet-18 ``stage`` for an encoder whose latent (stage 4) is
    ``latent_dim`` wide: ``latent_dim / 8 * 2^(stage - 1)``, and the latent itself at stage 4
    (the width of any encoder's latent, where the last block sits)."""
    if stage not in RESNET_STAGES:
        raise ConfigError(f"ResNet-18 has stages {RESNET_STAGES}, got {stage}")
    if stage == RESNET_STAGES[-1]:
        return latent_dim
    return latent_dim // 8 * 2 ** (stage - 1)


class MMTM(nn.Module):
    """One cross-modal bottleneck block over ``channels`` (modality -> channels)."""

    def __init__(self, channels: Mapping[str, int], ratio: float = 4.0) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ConfigError(f"an MMTM block needs at least 2 modalities, got {list(channels)}")
        self.modalities = tuple(channels)
        total = sum(channels.values())
        hidden = int(2 * total / ratio)
        if hidden < 1:
            raise ConfigError(f"MMTM ratio {ratio} leaves no bottleneck units for {total} channels")
        self.squeeze = nn.Linear(total, hidden)
        self.excite = nn.ModuleDict({m: nn.Linear(hidden, c) for m, c in channels.items()})
        for m, c in channels.items():
            self.register_buffer(f"average_{m}", torch.zeros(c))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def average(self, modality: str) -> Tensor:
        """The running mean of ``modality``'s gates over the training forwards so far."""
        return getattr(self, f"average_{modality}")

    def gates(self, squeezed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``g_m = sigmoid(W_m relu(W_s [s_1; ...; s_M] + b_s) + b_m)`` from channel means."""
        e = torch.relu(self.squeeze(torch.cat([squeezed[m] for m in self.modalities], dim=1)))
        return {m: torch.sigmoid(self.excite[m](e)) for m in self.modalities}

    def forward(
        self,
        features: Mapping[str, Tensor],
        frames: Mapping[str, int],
        update: bool = False,
        replaced: str | None = None,
    ) -> dict[str, Tensor]:
        """Rescale each modality's ``(B * T_m, C_m, H, W)`` feature map (``T_m = frames[m]``) or
        pooled ``(B, C_m)`` latent.

        ``update`` adds this batch's mean gates to the running means (training forwards);
        ``replaced`` names the modality whose gates are the running mean instead (curation).
        """
        shaped = {m: _unfold(features[m], frames[m]) for m in self.modalities}
        gates = self.gates({m: x.mean(dim=(1, 3, 4)) for m, x in shaped.items()})
        if update:
            with torch.no_grad():
                n = self.count.to(torch.float32)
                for m in self.modalities:
                    avg = self.average(m)
                    avg.copy_((gates[m].detach().float().mean(0) + avg * n) / (n + 1))
                self.count += 1
        if replaced is not None:
            g = gates[replaced]
            gates[replaced] = self.average(replaced).to(g.dtype).expand_as(g)
        out = {}
        for m, x in shaped.items():
            out[m] = (x * gates[m][:, None, :, None, None]).reshape(features[m].shape)
        return out


def _unfold(x: Tensor, frames: int) -> Tensor:
    """``(B * T, C, H, W)`` -> ``(B, T, C, H, W)``; latents ``(B, C)`` -> ``(B, 1, C, 1, 1)``."""
    if x.dim() == 2:
        return x[:, None, :, None, None]
    bt, c, h, w = x.shape
    return x.reshape(bt // frames, frames, c, h, w)


def _fold_input(encoder: ResNet18Encoder, x: Tensor) -> tuple[Tensor, int]:
    """The encoder's input as an image batch, and the number of frames folded into it."""
    channels, dims = encoder.input_shape[0], len(encoder.input_shape)
    if x.dim() != dims + 1 or x.shape[1] != channels:
        raise DataError(
            f"resnet18 got input of shape {tuple(x.shape)}, expected (B, {channels}, ...) with "
            f"{dims} dimensions after the batch"
        )
    if x.dim() == 5:  # (B, C, T, H, W) -> (B*T, C, H, W), as ResNet18Encoder folds frames
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w), t
    return x, 1


def staged_forward(
    encoders: Mapping[str, nn.Module],
    inputs: Mapping[str, Tensor],
    blocks: Mapping[int, MMTM],
    update: bool = False,
    replaced: str | None = None,
) -> dict[str, Tensor]:
    """Pooled latents of ResNet-18 ``encoders`` run stage by stage, with ``blocks[s]`` applied
    to every modality's feature map after stage ``s`` (see :meth:`MMTM.forward` for ``update``
    and ``replaced``)."""
    for m, enc in encoders.items():
        if not isinstance(enc, ResNet18Encoder):
            raise ConfigError(
                f"cross-modal blocks sit between ResNet-18 stages: modality {m!r} has a "
                f"{type(enc).__name__}; use encoder.{m}=resnet18"
            )
    h: dict[str, Tensor] = {}
    frames: dict[str, int] = {}
    for m, enc in encoders.items():
        x, frames[m] = _fold_input(enc, inputs[m])  # type: ignore[arg-type]
        h[m] = enc.stem(x)
    for stage in RESNET_STAGES:
        for m, enc in encoders.items():
            h[m] = enc.layers[2 * stage - 2 : 2 * stage](h[m])
        if stage in blocks:
            h = blocks[stage](h, frames, update=update, replaced=replaced)
    out = {}
    for m, enc in encoders.items():
        b = h[m].shape[0] // frames[m]
        out[m] = h[m].reshape(b, frames[m], enc.out_dim, -1).mean(dim=(1, 3))
    return out


def is_staged(encoders: Mapping[str, nn.Module]) -> bool:
    """Whether every encoder is a ResNet-18, so blocks can sit between its stages."""
    return all(isinstance(enc, ResNet18Encoder) for enc in encoders.values())


def latent_forward(
    encoders: Mapping[str, nn.Module],
    inputs: Mapping[str, Tensor],
    block: MMTM,
    update: bool = False,
    replaced: str | None = None,
) -> dict[str, Tensor]:
    """Every encoder on its modality, then ``block`` on the pooled latents ``(B, d_m)``."""
    latents = {m: enc(inputs[m]) for m, enc in encoders.items()}
    return block(latents, {m: 1 for m in latents}, update=update, replaced=replaced)


def greedy_blocks(
    latent_dims: Mapping[str, int], stages: Sequence[int], ratio: float
) -> nn.ModuleDict:
    """One :class:`MMTM` per stage in ``stages`` for ResNet-18 encoders with ``latent_dims``
    (stages whose ResNet-18 width would be 0 are left out: latents that narrow come from encoders
    without stages, which use the last block only)."""
    blocks = {}
    for s in stages:
        channels = {m: stage_channels(d, s) for m, d in latent_dims.items()}
        if min(channels.values()) > 0:
            blocks[str(s)] = MMTM(channels, ratio)
    return nn.ModuleDict(blocks)
