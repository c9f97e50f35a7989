"""MSLR: Modality-Specific Learning Rates (Yao & Mihalcea, Findings of ACL 2022).

One global learning rate can starve a modality whose encoder needs another pace; MSLR gives every
modality's encoder its own rate, ``lr_m = lr * c_m``, realised as the learning rate of the
optimizer's parameter group ``encoder.<m>`` (:meth:`~mmbalance.methods.base.Method.lr_scales`).
A per-group learning rate means the same under SGD and Adam, unlike the ports' gradient scaling,
which Adam normalises away (so ``scales_gradients`` is False here).

Strategies (``strategy``):

- ``fixed``: ``c_m = init_m`` for the whole run;
- ``sliding`` (default): ``c_m(t) = init_m * rho_m(t)`` with
  ``rho_m(t) = acc_m(t-1) / mean(acc_m(t-1-K) .. acc_m(t-2))``: the validation accuracy of
  modality ``m`` after the last epoch over its mean over the ``K`` (``window``) epochs before it.
  ``rho_m = 1`` until ``K`` earlier accuracies exist. It does not compound: ``c_m`` is always
  ``init_m`` times the current ratio. A modality that still improves gets a higher rate, one that
  stalls a lower one.

The accuracies are the epoch's **validation** accuracies of the unimodal heads,
``ctx.val_metrics["unimodal_accuracy_<m>"]`` at ``on_epoch_end``; never test data. The heads are
trained on **detached** latents (``detach_heads``, default), i.e. as linear probes: the encoders
then receive only the fused loss, as in both official ports, and the heads only measure what each
encoder's features tell about the label. ``detach_heads=false`` trains them as in ``multiloss``.

Departures from the code we know (the paper's own code and the names of its "three strategies"
were not retrieved):

- the AGM repository's port (``run/CREMAD_main.py``, method "MSLR", SGD) multiplies the encoder
  *and* its summed head's gradients by ``c_m``, and reads ``acc_m`` from the **test** loader; the
  MCR authors' port (``Bias_Infusion_MSLR``, Adam) multiplies the encoder's gradients and reads
  validation accuracies of the fusion head's per-modality slices. Here the encoder's learning
  rate is set (equal to gradient scaling under plain SGD, not under momentum with a changing
  factor or Adam), from validation accuracies of per-modality linear heads;
- both ports compute ``rho`` from the accuracy of the last epoch over the mean of the ``K`` before
  it and apply it during the next epoch: the same here.

Official settings: AGM port ``init = (0.9, 1.1)`` (audio, visual), ``K = 5``; MCR reruns
CREMA-D ResNet ``K = 20``, ``init = (0.7, 1.3)``, AVE ``K = 10``, ``(0.7, 1.3)``.

Logged per epoch: ``ratio_<m>``; the trainer records each group's factor as ``lr_scale_<group>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
from mmbalance.models.output import ModelOutput


def sliding_ratio(accuracy: float, previous: list[float], window: int) -> float:
    """``accuracy / mean(previous[-window:])``, or 1 while fewer than ``window`` are known (or
    their mean is 0)."""
    if len(previous) < window:
        return 1.0
    mean = sum(previous[-window:]) / window
    return accuracy / mean if mean > 0 else 1.0


@dataclass
class MSLRParams:
    """MSLR options.

    Attributes:
        strategy: fixed per-modality learning-rate factors, or factors that follow each
            modality's validation accuracy over a sliding window.
        init_scales: initial learning-rate factor c_m by modality (modalities not named: 1).
        window: K, the number of epochs of the sliding mean.
        lam_uni: weight of the unimodal-head losses.
        detach_heads: train the unimodal heads on detached latents (probes), so that the
            encoders see the fused loss only.
    """

    strategy: Literal["fixed", "sliding"] = "sliding"
    init_scales: dict[str, float] = field(default_factory=dict)
    window: int = 5
    lam_uni: float = 1.0
    detach_heads: bool = True

    def __post_init__(self) -> None:
        check(self.window >= 1, f"method.window must be >= 1, got {self.window}")
        check(self.lam_uni > 0, f"method.lam_uni must be > 0, got {self.lam_uni}")
        scales = {}
        for m, value in self.init_scales.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            check(ok, f"method.init_scales.{m} must be a number > 0, got {value!r}")
            scales[str(m)] = float(value)
        self.init_scales = scales


@METHODS.register("mslr")
class MSLR(Method):
    """Modality-specific learning rates (ACL Findings 2022): each encoder's rate is ``init_m``
    times the ratio of its validation accuracy to its recent mean."""

    name = "mslr"
    tasks = ("classification",)
    Params = MSLRParams
    needs_unimodal_heads = True
    search_space = ("method.window", (3, 5, 10))

    @classmethod
    def check_schedule(cls, params: Any, epochs: int) -> None:
        # the sliding ratio needs ``window`` earlier accuracies: it is computed at the end of
        # epoch ``window`` and used from epoch ``window + 1``; fixed factors of 1 never act
        fixed_only = all(v == 1 for v in params.init_scales.values())
        if params.strategy == "sliding" and fixed_only and params.window + 1 >= epochs:
            cls.refuse_idle_schedule(
                f"in epoch {params.window + 1} (0-based; window={params.window})",
                epochs,
                "lower method.window or raise train.epochs",
            )
        if params.strategy == "fixed" and fixed_only:
            cls.refuse_idle_schedule(
                "never (strategy=fixed with every init_scale 1)", epochs, "set method.init_scales"
            )

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self._accuracies: dict[str, list[float]] = {}
        self._ratios: dict[str, float] = {}

    def setup(self, info: ModelInfo) -> nn.Module | None:
        super().setup(info)
        unknown = set(self.params.init_scales) - set(info.modalities)
        if unknown:
            raise ConfigError(
                f"method.init_scales names modalities {sorted(unknown)} that the model lacks; "
                f"its modalities: {', '.join(info.modalities)}"
            )
        return None

    def encode(
        self, model: nn.Module, inputs: Mapping[str, Tensor], ctx: StepContext
    ) -> dict[str, Tensor]:
        latents = model.encode(inputs)
        if self.params.detach_heads:
            heads = getattr(model, "unimodal_heads", None)
            if not heads:
                raise ConfigError("method 'mslr' needs a unimodal head for every modality")
            # the heads as probes: their loss trains them and never reaches the encoders
            probes = {m: head(latents[m].detach()) for m, head in heads.items()}
            ctx.scratch["probes"] = probes  # the unimodal terms of losses
        return latents

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, Tensor]:
        terms = {"task": ctx.task_loss(output.logits)}
        probes = ctx.scratch.get("probes")
        if probes is None:
            return terms | unimodal_losses(output, ctx, self.params.lam_uni)
        return terms | {
            f"uni_{m}": self.params.lam_uni * ctx.task_loss(u) for m, u in probes.items()
        }

    # --- learning rates --------------------------------------------------------------------------
    def scale(self, modality: str) -> float:
        """``c_m`` for the coming epoch."""
        ratio = self._ratios.get(modality, 1.0) if self.params.strategy == "sliding" else 1.0
        return self.params.init_scales.get(modality, 1.0) * ratio

    def lr_scales(self) -> Mapping[str, float]:
        if self.info is None:
            return {}
        return {f"encoder.{m}": self.scale(m) for m in self.info.modalities}

    def on_epoch_end(self, ctx: EpochContext) -> None:
        if self.info is None:
            raise ConfigError("method 'mslr' was not set up (call setup before the epoch hooks)")
        for m in self.info.modalities:
            key = f"unimodal_accuracy_{m}"
            if key not in ctx.val_metrics:
                raise ConfigError(
                    f"method 'mslr' needs the validation metric {key!r} (unimodal heads and a "
                    "validation pass every epoch)"
                )
            accuracy = float(ctx.val_metrics[key])
            previous = self._accuracies.setdefault(m, [])
            self._ratios[m] = sliding_ratio(accuracy, previous, self.params.window)
            previous.append(accuracy)
            del previous[: -self.params.window]
            ctx.log(f"ratio_{m}", self._ratios[m])

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "accuracies": {m: list(v) for m, v in self._accuracies.items()},
            "ratios": dict(self._ratios),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._accuracies = {m: [float(a) for a in v] for m, v in state["accuracies"].items()}
        self._ratios = {m: float(r) for m, r in state["ratios"].items()}
