"""A compiled training step (``train.compile``): ``torch.compile`` of the step's forward.

The forward of a step (:class:`~mmbalance.methods.protocol.StepModule`: the method's ``encode``
and ``transform_latents``, the heads, the method's ``losses``) is what the trainer compiles, by
replacing :attr:`~mmbalance.methods.protocol.TrainingProtocol.forward` with
``torch.compile(forward)``; the sequence of hooks around it stays as it is, and the modules,
their parameters and their ``state_dict`` keys do not change, so checkpoints are the same either
way. The forward returns the losses alone: every tensor a compiled graph returns that requires
grad is an output of its backward node, and autograd hands the node zeros for the outputs the
loss does not use, so a returned output that a loss leaves out (a modality a method does not
train in this step, a head it leaves out) would give its parameters zero gradients instead of
none, which an optimizer does not skip (momentum, weight decay and Adam's moments would move
them).

What a method computes in its forward is compiled with the model: MCR's masked set evaluations
and divergences, MMPareto's losses, OGM's discrepancy scores and coefficients. A method's own
steps outside the forward (``backward``, ``rewrite_gradients``: OGM-GE's noise, MMPareto's
gradient combination) run eagerly; Dynamo breaks the graph where a method reads a value on the
host (a random seed, a Python branch on a tensor) and compiles the pieces around it.

``train.compile``:

- ``false`` (the default): eager;
- ``true``: compiled from the first step;
- ``auto``: the first :data:`EAGER_PROBE` steps run eagerly (timed after the first), then
  compiled: the first compiled step compiles, the next :data:`COMPILED_PROBE` are timed. The
  step stays compiled only if the measured saving per step times the steps left in the run
  exceeds the compile time; otherwise the run goes back to eager. The decision and its reason go
  to the log, and into ``last.ckpt``, so that a resumed run keeps it.

The compile time is reported once per run (a log line at the end of training, and ``compile``
in ``metrics.json``: the mode, whether the run ended compiled, the seconds and the reason): the
seconds Dynamo spent compiling during the run's compiled steps (its own account, recompilations
included: a last, smaller batch of an epoch; where torch keeps no account, the first compiled
step's wall time). Each run compiles afresh (``torch._dynamo.reset()`` when it starts), so that
many runs in one process never exhaust Dynamo's cache and fall back to eager unnoticed.

Compiled and eager steps give the same gradients to rounding (``tests/test_compile.py``, every
registered method). A run resumes exactly when ``train.compile`` is ``true`` or ``false``, and
with ``auto`` once the decision is taken (it is taken before the end of the first epoch unless
that epoch has fewer than ``EAGER_PROBE + 1 + COMPILED_PROBE`` steps).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

#: eagerly timed steps of ``auto`` (the first of them, which warms up allocations, is not timed)
EAGER_PROBE = 3
#: compiled steps timed by ``auto`` after the one that compiles
COMPILED_PROBE = 3

#: the backend of ``torch.compile`` (tests may use a cheaper one)
BACKEND: str | Callable[..., Any] = "inductor"

Mode = bool | Literal["auto"]


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (Dynamo's own account: frame compilation
    with the backend, and the lazily compiled backward passes); ``nan`` where torch keeps none."""
    spent = getattr(torch._dynamo.utils, "cumulative_time_spent_ns", None)
    if not isinstance(spent, Mapping):
        return math.nan
    keys = ("entire_frame_compile", "entire_backward_compile")
    return sum(float(spent.get(k, 0.0)) for k in keys) / 1e9


class StepCompiler:
    """Switches a protocol's forward between eager and compiled, times steps, decides ``auto``.

    Args:
        protocol: the :class:`~mmbalance.methods.protocol.TrainingProtocol` whose ``forward``
            is compiled (its eager forward is kept to switch back).
        mode: ``train.compile``.
        total_steps: the steps the run is expected to take (epochs times batches).
        log: where the lines of the run go (default: standard error).
    """

    def __init__(
        self,
        protocol: Any,
        mode: Mode,
        total_steps: int,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.protocol = protocol
        self.mode: Mode = mode
        self.total_steps = total_steps
        self.log = log or (lambda line: print(f"mmbalance: {line}", file=sys.stderr))
        self.eager_forward = protocol.forward
        self.compiled_forward: Callable[..., Any] | None = None
        #: ``None`` while ``auto`` measures; then whether the step stays compiled
        self.decision: bool | None = None if mode == "auto" else bool(mode)
        self.reason = "" if mode == "auto" else ("train.compile=true" if mode else "")
        #: seconds spent compiling in this run (``None`` before the first compiled step)
        self.seconds: float | None = None
        self._eager: list[float] = []
        self._compiled: list[float] = []
        self._steps = 0
        self._spent_before = 0.0
        self._reported = False
        # a run compiles afresh: runs in one process (a comparison) would otherwise fill Dynamo's
        # cache of the forward's code and fall back to eager without a word
        torch._dynamo.reset()

    # --- state (so that a resumed ``auto`` run keeps its decision) --------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "seconds": self.seconds, "reason": self.reason}

    def load_state_dict(self, state: Any) -> None:
        if self.mode != "auto" or not isinstance(state, Mapping):
            return
        decision = state.get("decision")
        if isinstance(decision, bool):
            self.decision = decision
            self.reason = str(state.get("reason", ""))
            self._reported = True
            seconds = state.get("seconds")
            self.seconds = float(seconds) if isinstance(seconds, int | float) else None

    # --- the step ------------------------------------------------------------------------------
    @property
    def compiling(self) -> bool:
        """Whether the next step runs compiled."""
        if self.decision is not None:
            return self.decision
        return self._steps >= EAGER_PROBE  # auto, measuring

    def before_step(self) -> None:
        """Put the protocol's forward in the state of the next step."""
        if self.compiling:
            if self.compiled_forward is None:
                self.compiled_forward = torch.compile(self.eager_forward, backend=BACKEND)
            self.protocol.forward = self.compiled_forward
            self._spent_before = compile_seconds()
        else:
            self.protocol.forward = self.eager_forward

    def after_step(self, seconds: float) -> None:
        """Record the wall time of the step just run; decide ``auto`` when it has measured."""
        self._steps += 1
        if self.protocol.forward is not self.compiled_forward:
            if self._steps > 1:  # the first step warms up whatever it allocates
                self._eager.append(seconds)
            return
        spent = compile_seconds() - self._spent_before
        if math.isnan(spent):  # no account kept: the first compiled step is the compiling one
            spent = seconds if self.seconds is None else 0.0
        self.seconds = (self.seconds or 0.0) + spent
        if spent == 0.0:
            self._compiled.append(seconds)
        if self.decision is None and len(self._compiled) >= COMPILED_PROBE:
            self._decide()

    def finish(self) -> None:
        """At the end of the training steps: say once what compiling cost."""
        if self.decision is None:  # auto with too few steps to decide: eager from here
            self.decision = False
            self.reason = "the run ended before the measurement did"
            self.protocol.forward = self.eager_forward
        if not self._reported:
            self._reported = True
            verdict = "compiled" if self.decision else "eager"
            took = "nothing compiled" if self.seconds is None else f"{self.seconds:.1f} s"
            self.log(
                f"train.compile={_text(self.mode)}: {verdict}; compiling took {took} "
                f"({self.reason})"
            )

    def _decide(self) -> None:
        eager = statistics.median(self._eager) if self._eager else math.inf
        steady = statistics.median(self._compiled)
        saving = eager - steady
        left = max(0, self.total_steps - self._steps)
        spent = self.seconds or 0.0
        keep = saving * left > spent
        self.decision = keep
        self.reason = (
            f"a compiled step saves {saving * 1e3:.2f} ms ({eager * 1e3:.2f} ms eager, "
            f"{steady * 1e3:.2f} ms compiled), {saving * left:.1f} s over the {left} steps "
            f"left, {'more' if keep else 'no more'} than the {spent:.1f} s compiling took"
        )
        if not keep:
            self.protocol.forward = self.eager_forward
        self.log(
            f"train.compile=auto: {'compiled' if keep else 'eager'} from step "
            f"{self._steps} ({self.reason})"
        )

    def summary(self) -> dict[str, Any]:
        """``compile`` of ``metrics.json``."""
        return {
            "mode": _text(self.mode),
            "compiled": bool(self.decision),
            "seconds": self.seconds,
            "reason": self.reason,
        }


def _text(mode: Mode) -> str:
    return mode if isinstance(mode, str) else str(mode).lower()


__all__ = [
    "BACKEND",
    "COMPILED_PROBE",
    "EAGER_PROBE",
    "StepCompiler",
    "compile_seconds",
]
