"""Greedy: balanced multimodal learning against the greedy nature of joint training (Wu, Jastrzebski,
Cho, Geras, ICML 2022; official code nyukat/greedy_multimodal_learning).

Architecture. The ResNet-18 encoders exchange information through cross-modal bottleneck blocks
(:class:`~mmbalance.models.mmtm.MMTM`) after stages 2, 3 and 4 (``stages``; the official
``mmtm2..4``, ratio 4). Encoders of other kinds (MLPs, transformers) have no stages; they get
the last block only, on their pooled latents, which is exactly what the stage-4 block computes
on a ResNet (a per-channel gate commutes with the spatial mean, and the squeeze of the stage-4 map
is the pooled latent); the stage-2 and stage-3 blocks then stay unused. This is a departure (the
method is defined for stage-wise CNNs) that lets Greedy run on every dataset of the library; the
faithful architecture needs ``encoder.<m>=resnet18`` for every modality. The blocks live in the
module :meth:`Greedy.setup` returns, and the
method encodes through them both in training (:meth:`Greedy.encode`) and at evaluation
(:meth:`Greedy.encode_eval`), so the validation and test passes, the epoch feature passes and
the end-of-run analysis see the model that was trained, and the selected checkpoint holds the
blocks of its epoch. As in the official model each modality has its own linear head; the loss
is the sum of their cross-entropies and the prediction the mean of their logits
(``objective="unimodal"``); ``objective="fused"`` trains and predicts with the fusion head
instead, as BalanceBenchmark does.

Balancing. A modality's *bypass* parameters are the blocks' shared squeeze layers plus its own
excitation layers; its *main* parameters are its encoder and (``objective="unimodal"``) its head.
After every backward that is not in curation mode, the conditional learning speeds are
accumulated, ``M_bypass_m += |g|^2 / |theta|^2`` and ``M_main_m += |g|^2 / |theta|^2`` (squared
norms summed over the group's tensors before the ratio; a tensor without a gradient counts as a
zero gradient), and ``BDR_m = log10(M_bypass_m / M_main_m)``. From epoch ``start_epoch`` on, if
``max BDR - min BDR > alpha`` the next ``window`` steps run in curation mode for the modality
with the largest BDR (the *cared* modality): in every block its gates are the running mean of
its gates instead of this batch's, so its branch gets no per-sample information from the other
modalities and has to learn on its own. For two modalities this is the official rule
``d_BDR = BDR_0 - BDR_1``, ``|d_BDR| > epsilon``, cared modality 0 if ``d_BDR > 0`` else 1.
Speeds are not accumulated during curation steps, as in the official callback.

Where this follows or departs from the official code and from BalanceBenchmark (BB):

- The running mean of the gates is kept per modality from that modality's own gates. The
  official ``MMTM_mitigate`` updates the second modality's running mean with the *first*
  modality's gates (``running_avg_weight_skeleton`` from ``vis_out``), and BB's ``MMTM`` resets
  its ``running_avg_weight`` dictionary on every forward and then indexes it (a ``KeyError``), so
  BB's Greedy cannot run. The official running means also advance on evaluation forwards and the
  official evaluation runs in whatever curation mode training left; here evaluation neither
  updates the means nor curates.
- Official issue #1 (the conditional utilisation rate ``d_util`` of its analysis can leave
  [-1, 1]) concerns the paper's analysis tool, not training; it is not part of this method.
- The official thresholds and schedule are kept: ``alpha`` (``epsilon``) 0.01, ``window`` 5,
  unlocked from the second epoch (``starting_epoch=2`` with 1-based epochs: ``start_epoch=1``).
  BB uses ``alpha`` 0.001 and no delay.
- More than two modalities: the BDR spread and the largest BDR generalise the sign rule.
- The official ``objective`` has no classification requirement beyond cross-entropy; a
  regression task uses the task loss of each head (``objective="unimodal"``) or of the fusion
  head.

Official settings (ModelNet40 front/rear views): SGD lr 0.1, no momentum, no weight decay,
batch 8, up to 300 epochs with ReduceLROnPlateau. Logged per step: ``bdr_<m>``, ``curation`` (1 in a curation
step), ``cared`` (the index of the cared modality, -1 outside curation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.config import check
from mmbalance.errors import ConfigError
from mmbalance.methods.base import (
    METHODS,
    EpochContext,
    Method,
    ModelInfo,
    StepContext,
    unimodal_losses,
)
from mmbalance.models.mmtm import (
    RESNET_STAGES,
    greedy_blocks,
    is_staged,
    latent_forward,
    staged_forward,
)
from mmbalance.models.output import ModelOutput


def _squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``sum_i |t_i|^2`` in float32 (one fused kernel per dtype and device)."""
    return torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])).pow(2).sum()


def learning_speed(params: Sequence[nn.Parameter]) -> Tensor:
    """``sum |g|^2 / sum |theta|^2`` over ``params`` (no gradient counts as zero), a 0-d tensor."""
    w2 = _squared_norm(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros_like(w2)
    return _squared_norm(grads) / w2


def cared_modality(bdr: Sequence[float], alpha: float) -> int | None:
    """The index of the modality to curate: the largest BDR when the spread exceeds ``alpha``."""
    if max(bdr) - min(bdr) > alpha:
        return max(range(len(bdr)), key=lambda i: bdr[i])
    return None


@dataclass
class GreedyParams:
    """Greedy options.

    Attributes:
        alpha: curation starts when the spread of the modalities' BDRs exceeds this (the
            official ``epsilon`` 0.01; BalanceBenchmark 0.001).
        window: steps of each curation window (official 5).
        start_epoch: first epoch (0-based) in which curation may start (official 1: the
            second epoch).
        stages: ResNet-18 stages after which a cross-modal block sits (official 2, 3, 4).
        ratio: bottleneck ratio of the blocks: ``int(2 * sum C / ratio)`` units (official 4).
        objective: ``unimodal`` (sum of the unimodal heads' losses, mean of their logits as
            the prediction: the official model) or ``fused`` (the fusion head: BalanceBenchmark).
    """

    alpha: float = 0.01
    window: int = 5
    start_epoch: int = 1
    stages: list[int] = field(default_factory=lambda: [2, 3, 4])
    ratio: float = 4.0
    objective: Literal["unimodal", "fused"] = "unimodal"

    def __post_init__(self) -> None:
        check(self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}")
        check(self.window >= 1, f"method.window must be >= 1, got {self.window}")
        check(self.start_epoch >= 0, f"method.start_epoch must be >= 0, got {self.start_epoch}")
        check(
            len(self.stages) > 0
            and len(set(self.stages)) == len(self.stages)
            and set(self.stages) <= set(RESNET_STAGES),
            f"method.stages must be distinct ResNet-18 stages {list(RESNET_STAGES)}, "
            f"got {self.stages}",
        )
        check(self.ratio > 0, f"method.ratio must be > 0, got {self.ratio}")


@METHODS.register("greedy")
class Greedy(Method):
    """Cross-modal blocks between ResNet stages; curation when conditional speeds diverge."""

    name = "greedy"
    Params = GreedyParams
    needs_unimodal_heads = True
    search_space = ("method.alpha", (0.001, 0.01, 0.1))

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.blocks: nn.ModuleDict | None = None
        self.speeds: dict[str, list[float]] = {}  # m -> [M_bypass, M_main]
        self.curation_steps = 0  # steps of the current curation window still to run
        self.cared: str | None = None
        self._main: dict[str, list[nn.Parameter]] = {}  # each modality's main parameters
        self._active: list[int] = []  # the stages whose blocks are in use

    def setup(self, info: ModelInfo) -> nn.Module:
        super().setup(info)
        self.blocks = greedy_blocks(info.latent_dims, self.params.stages, self.params.ratio)
        self.speeds = {m: [0.0, 0.0] for m in info.modalities}
        self._active = [int(s) for s in self.blocks]
        groups = info.parameter_groups
        main = ["encoder"] + (["unimodal_head"] if self.params.objective == "unimodal" else [])
        self._main = {
            m: [p for kind in main for p in groups.get(f"{kind}.{m}", ())] for m in info.modalities
        }
        return self.blocks

    def _forward(
        self, model: nn.Module, inputs: Mapping[str, Tensor], update: bool, replaced: str | None
    ) -> dict[str, Tensor]:
        """The latents through the blocks: between ResNet-18 stages, else on the latents."""
        if self.blocks is None:
            raise RuntimeError("call setup() before encoding with Greedy")
        blocks = {int(s): b for s, b in self.blocks.items()}
        encoders = model.encoders  # type: ignore[attr-defined]
        if is_staged(encoders):
            self._active = list(blocks)
            return staged_forward(encoders, inputs, blocks, update, replaced)
        last = RESNET_STAGES[-1]
        if last not in blocks:
            raise ConfigError(
                f"method 'greedy' on encoders other than resnet18 can only use the block after "
                f"the last stage; method.stages must include {last}, got {self.params.stages}"
            )
        self._active = [last]
        return latent_forward(encoders, inputs, blocks[last], update, replaced)

    # --- encoding ---------------------------------------------------------------------------------
    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        replaced = self.cared if self.curation_steps > 0 else None
        ctx.log("curation", float(replaced is not None))
        return self._forward(model, inputs, update=True, replaced=replaced)

    def encode_eval(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._forward(model, inputs, update=False, replaced=None)

    def on_train_start(self, ctx: EpochContext) -> None:
        """Refuse, before the first step, stages that encoders without stages cannot take."""
        encoders = getattr(ctx.model, "encoders", None)
        if encoders is not None and not is_staged(encoders):
            if RESNET_STAGES[-1] not in self.params.stages:
                raise ConfigError(
                    f"method 'greedy' on encoders other than resnet18 can only use the block "
                    f"after the last stage; method.stages must include {RESNET_STAGES[-1]}"
                )

    # --- losses and prediction --------------------------------------------------------------------
    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        if self.params.objective == "unimodal":
            return unimodal_losses(output, ctx, 1.0)
        return {"task": ctx.task_loss(output.logits)}

    def predict(self, output: ModelOutput) -> Tensor:
        if self.params.objective == "unimodal":
            return torch.stack(list(output.unimodal_logits.values())).mean(0)
        return output.logits

    # --- the balancing rule (after backward, before the optimizer step) ---------------------------
    def bypass_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Each modality's bypass: every block's shared squeeze plus its own excitations."""
        if self.blocks is None or self.info is None:
            raise RuntimeError("call setup() first")
        out: dict[str, list[nn.Parameter]] = {m: [] for m in self.info.modalities}
        for block in (self.blocks[str(s)] for s in self._active):
            shared = list(block.squeeze.parameters())
            for m in self.info.modalities:
                out[m] += shared + list(block.excite[m].parameters())
        return out

    def rewrite_gradients(self, ctx: StepContext) -> None:
        assert self.info is not None
        if self.curation_steps > 0:  # a curation step: no speed update, count the window down
            self.curation_steps -= 1
            ctx.log("cared", float(self.info.modalities.index(self.cared or "")))
            if self.curation_steps == 0:
                self.cared = None
            return
        if not any(self._main.values()):
            raise ConfigError(
                "method 'greedy' measures its modalities' learning speeds on their encoders: set "
                "it up with the model's parameter groups (ModelInfo.parameter_groups)"
            )
        bypass = self.bypass_parameters()
        modalities = self.info.modalities
        ratios = torch.stack(
            [learning_speed(group[m]) for m in modalities for group in (bypass, self._main)]
        ).tolist()  # one host synchronisation for all 2M speeds
        bdr = []
        for i, m in enumerate(modalities):
            self.speeds[m][0] += ratios[2 * i]
            self.speeds[m][1] += ratios[2 * i + 1]
            b, main = self.speeds[m]
            value = math.log10(b / main) if b > 0 and main > 0 else 0.0
            bdr.append(value)
            ctx.log(f"bdr_{m}", value)
        ctx.log("cared", -1.0)
        if ctx.epoch >= self.params.start_epoch:
            chosen = cared_modality(bdr, self.params.alpha)
            if chosen is not None:
                self.cared = self.info.modalities[chosen]
                self.curation_steps = self.params.window

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "speeds": {m: list(v) for m, v in self.speeds.items()},
            "curation_steps": self.curation_steps,
            "cared": self.cared,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.speeds = {m: [float(x) for x in v] for m, v in state["speeds"].items()}
        self.curation_steps = int(state["curation_steps"])
        self.cared = state["cared"]
