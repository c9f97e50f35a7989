"""``train.compile``: compiled and eager steps give the same gradients, for every method; the
compile time is reported; ``auto`` decides on the measured saving.

Cost: compiling on CPU is slow, so the sweep over every registered method compiles with the
``aot_eager`` backend (Dynamo's graph capture and AOT autograd's functionalised forward and
backward, run by eager kernels: everything compiling changes in a step but the code generator),
and only MCR, whose regulariser is what the compiled step is for, compiles with inductor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_trainer
from test_method_contract import contract_config, contract_epochs

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.train import compiling
from mmbalance.train.compiling import StepCompiler

STEPS = 3


class CountingBackend:
    """``aot_eager`` (or another backend), counting the graphs it is given and recording the
    Python ``math`` functions they call."""

    def __init__(self, backend: str) -> None:
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs = 0
        self.python_math: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        self.python_math += [
            str(node.target)
            for node in gm.graph.nodes
            if node.op == "call_function" and _python_math(node.target)
        ]
        return self.backend(gm, example_inputs)


def _python_math(target: Any) -> bool:
    """Whether a graph node calls a ``math`` function: as itself, or as the symbolic
    ``torch._sym_sin``-style op Dynamo records for one on a symbolic number."""
    module, name = getattr(target, "__module__", ""), getattr(target, "__name__", "")
    return module == "math" or (module == "torch" and name.startswith("_sym_"))


def _steps(name: str, compiled: bool, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gradients of the last of :data:`STEPS` training steps of the contract's last epoch
    (where every method's schedule acts), and the weights after them, for the contract's tiny
    run of ``name``."""
    epochs = contract_epochs(name)
    cfg = contract_config(name, epochs=epochs, **{"train.compile": compiled})
    trainer = build_trainer(cfg, out)
    ctx = trainer.epoch_context(0)
    ctx.initial_encoder_state = {
        k: v.detach().clone() for k, v in trainer.model.encoders.state_dict().items()
    }
    trainer.method.on_train_start(ctx)
    epoch = epochs - 1
    start = trainer.protocol.begin_epoch(
        trainer.epoch_context(epoch), trainer.optimizer, lambda _: 0.05
    )
    # a method that re-samples its epochs (remix) steps on its first subset, as the loop would
    subset = start.subsets[0].name if start.subsets else None
    trainer.train_mode()
    torch.manual_seed(7)
    done = 0
    while done < STEPS:
        for batch in trainer.loaders["train"]:
            trainer.train_step(batch, epoch, done / STEPS, subset=subset)
            done += 1
            if done == STEPS:
                break
    module = trainer.protocol.module
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    weights = {n: v.detach().clone() for n, v in module.state_dict().items()}
    return grads, weights


def _assert_close(eager: dict[str, Any], compiled: dict[str, Any], what: str, **tol: Any) -> None:
    assert eager.keys() == compiled.keys(), what
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], **tol)


def _assert_rounding(eager: dict[str, Any], compiled: dict[str, Any], what: str) -> None:
    """Equal to float32 rounding at each tensor's scale: a reordered sum of ``n`` terms differs by
    about ``n * 6e-8`` of its largest term, and MCR's game weights cancel large terms (``W_S``
    sums weights of opposite sign)."""
    assert eager.keys() == compiled.keys(), what
    for key, value in eager.items():
        scale = float(value.abs().max())
        worst = float((compiled[key] - value).abs().max())
        assert worst <= 1e-3 * scale + 1e-7, f"{what} {key}: {worst:.2e} at scale {scale:.2e}"


def _both_ways(name: str, backend: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``(eager, compiled)``, each the gradients and weights of :func:`_steps`."""
    counting = CountingBackend(backend)
    monkeypatch.setattr(compiling, "BACKEND", counting)
    eager = _steps(name, False, out / "eager")
    compiled = _steps(name, True, out / "compiled")
    assert counting.graphs >= 1, f"{name}: nothing was compiled"
    # Python arithmetic on the step or epoch counters (a schedule) must run eagerly: traced, the
    # counters become symbolic integers once they change, and inductor's C++ code cannot call
    # ``math.sin`` on one (AMCo's mask ratio did)
    assert not counting.python_math, f"{name}: {counting.python_math} traced into a graph"
    assert eager[0], f"{name}: no gradient after {STEPS} steps"
    return eager, compiled


@pytest.mark.parametrize("name", METHODS.names())
def test_compiled_and_eager_steps_give_equal_gradients(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (grads, weights), (c_grads, c_weights) = _both_ways(name, "aot_eager", tmp_path, monkeypatch)
    _assert_close(grads, c_grads, f"{name} gradient", rtol=1e-5, atol=1e-6)
    _assert_close(weights, c_weights, f"{name} weight", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mcr"])
def test_inductor_compiled_steps_give_equal_gradients(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (grads, weights), (c_grads, c_weights) = _both_ways(name, "inductor", tmp_path, monkeypatch)
    # inductor fuses and reorders reductions: equal to float32 rounding, not bit for bit
    _assert_rounding(grads, c_grads, f"{name} gradient")
    _assert_rounding(weights, c_weights, f"{name} weight")


class _Protocol:
    def __init__(self) -> None:
        self.forward = self.eager

    def eager(self) -> None:
        pass


def _probe(monkeypatch: pytest.MonkeyPatch, total_steps: int, compile_s: float) -> StepCompiler:
    """``auto`` on a protocol whose eager steps take 10 ms and compiled ones 4 ms, the first
    compiled step compiling for ``compile_s`` seconds."""
    spent = [0.0]
    monkeypatch.setattr(compiling, "compile_seconds", lambda: spent[0])
    lines: list[str] = []
    compiler = StepCompiler(_Protocol(), "auto", total_steps, log=lines.append)
    compiler.lines = lines  # type: ignore[attr-defined]
    for _ in range(total_steps):
        compiler.before_step()
        compiled = compiler.protocol.forward is compiler.compiled_forward
        if compiled and compiler.seconds is None:
            spent[0] += compile_s
        compiler.after_step(0.004 if compiled else 0.010)
        if compiler.decision is not None:
            break
    return compiler


def test_auto_compiles_only_where_the_saving_exceeds_the_compile_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mmbalance.train.compiling import COMPILED_PROBE, EAGER_PROBE

    probe = EAGER_PROBE + 1 + COMPILED_PROBE
    # 6 ms saved per step: 2 s of compiling pays off after 334 more steps
    kept = _probe(monkeypatch, probe + 400, 2.0)
    assert kept.decision is True and kept.protocol.forward is kept.compiled_forward
    assert kept.seconds == pytest.approx(2.0)
    assert "6.00 ms" in kept.reason and "400 steps left" in kept.reason
    assert kept.lines == [f"train.compile=auto: compiled from step {probe} ({kept.reason})"]
    dropped = _probe(monkeypatch, probe + 300, 2.0)
    assert dropped.decision is False and dropped.protocol.forward == dropped.protocol.eager
    assert "no more than the 2.0 s" in dropped.reason
    # a resumed run keeps the decision (and does not measure again)
    again = StepCompiler(_Protocol(), "auto", probe + 300, log=lambda _: None)
    again.load_state_dict(dropped.state_dict())
    again.before_step()
    assert again.decision is False and again.protocol.forward == again.protocol.eager
    assert again.summary() == {
        "mode": "auto",
        "compiled": False,
        "seconds": pytest.approx(2.0),
        "reason": dropped.reason,
    }


def test_compiled_run_reports_its_compile_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmbalance.train import fit, loop

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    # the end-of-run analysis is not what this test is about
    monkeypatch.setattr(loop, "analyze_model", lambda *a, **k: ({}, {}))
    monkeypatch.setattr(loop, "robustness_metrics", lambda *a, **k: {})
    cfg = contract_config("joint", epochs=1, **{"train.compile": True})
    fit(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["compile"]
    assert summary["mode"] == "true" and summary["compiled"] is True
    assert summary["seconds"] > 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "train.compile" in x]
    assert lines == [
        f"mmbalance: train.compile=true: compiled; compiling took {summary['seconds']:.1f} s "
        "(train.compile=true)"
    ]


@pytest.mark.parametrize("value", ["maybe", 1])
def test_compile_option_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"train\.compile"):
        contract_config("joint", **{"train.compile": value})
