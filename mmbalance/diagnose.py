"""``mmbalance diagnose``: do the modalities of a dataset compete, and what to try if they do.

It trains, with the dataset's recipe and a few seeds, the two runs that need no balancing method:
``joint`` and the ``ensemble`` (one encoder and head per modality, each trained by its own loss
only: the unimodal models side by side, sharing no parameter). Each modality *alone* is read off
the ensemble: its head's test accuracy and its encoder's linear probe, selected on the
ensemble's validation accuracy. (``benchmarks/find_av_regime.py`` trains each modality in a run
of its own instead, selected on that modality's validation accuracy; the diagnosis saves those
runs so that it costs two runs per seed.) On the ensemble's selected encoders it then fits the
stacked probe and measures each head's confidence in the true class. The runs go through the
comparison engine (:func:`~mmbalance.compare.run_comparison`, in :func:`_train`): they are reused
and resumed as ``compare`` reuses them, in the same directory layout (``OUT/joint/seed0``, ...,
``OUT/results.json``; ``mmbalance report OUT`` works on it), and the diagnosis reads each run's
:class:`~mmbalance.compare.RunSummary`.

From those numbers come the criteria of :mod:`mmbalance.report.regime` (the ones the regime
search used), a verdict in plain words, and what to try next, grounded in the measured studies
of ``docs/results.md`` (:data:`ADVICE`), ending with the exact ``mmbalance compare`` command.
Everything is printed and written to ``OUT/diagnosis.json``, ``OUT/diagnosis.md`` and, with the
per-epoch curves, ``OUT/diagnosis_curves.png``.
"""

from __future__ import annotations

import math
import shlex
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmbalance.builder import (
    ResolvedConfig,
    build_components,
    build_dataset,
    make_fabric,
    resolve_config,
)
from mmbalance.compare import RunSummary, run_comparison
from mmbalance.config import PRESENTATION_KEYS, value_text
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.eval.correctness import OUTCOMES
from mmbalance.eval.probe import latents_of, stacked_probe_accuracy
from mmbalance.io import write_json_atomic, write_text_atomic
from mmbalance.report import (
    Column,
    Stat,
    Table,
    describe,
    fmt_stat,
    to_markdown,
    to_text,
)
from mmbalance.report.plots import plot_modality_curves
from mmbalance.report.records import read_history
from mmbalance.report.regime import (
    GAP_SE_FACTOR,
    MIN_FUSION_GAIN,
    MIN_GAP,
    MIN_PROBE_DEFICIT,
    RegimeEvidence,
    SeedNumbers,
    Verdict,
    points_interval,
    regime_evidence,
    regime_stat,
    verdict,
)
from mmbalance.report.stats import seeds_for_significance

#: Seeds of a diagnosis unless ``--seeds`` says otherwise.
DEFAULT_SEEDS = 3
#: The runs of one seed.
RUNS = ("joint", "ensemble")
#: A modality's curve has stopped rising once it never again gains this much (1 point).
STALL = 0.01
#: The fewest and the most seeds the suggested comparison asks for.
SUGGESTED_SEEDS = (3, 20)


@dataclass(frozen=True)
class Advice:
    """One step of what to try next: methods, why (citing a measured study), and whether it
    applies only when training with SGD."""

    methods: tuple[str, ...]
    why: str
    sgd_only: bool = False


#: What to try next, per verdict, from the measured studies of ``docs/results.md`` (a test checks
#: every claim against that page's tables).
ADVICE: dict[str, tuple[Advice, ...]] = {
    "competition": (
        Advice(
            ("unipre_frozen", "unipre_finetuned"),
            "Unimodal pre-training first: in the competition regime of docs/results.md "
            "(AV-Fashion-CNN, Adam, 5 seeds, every method searched alike) both closed all of the "
            "gap between joint and the ensemble (their means passed the ensemble's).",
        ),
        Advice(
            ("mbsd", "greedy", "umt", "mcr", "mmpareto", "dgl", "multiloss"),
            "Multi-loss training, distillation and regularisers next: they closed 45 to 100 % of "
            "the gap there, none significantly above joint after Holm's correction over 33 "
            "methods.",
        ),
        Advice(
            ("mlb", "pmr", "ogm_ge"),
            "Gradient-modulation methods only under SGD: under Adam, ogm, ogm_ge, mslr and agm "
            "ended below joint in that study (ogm_ge significantly); in its SGD arm, mlb and pmr "
            "ended above their joint reference, though not significantly.",
            sgd_only=True,
        ),
    ),
    "no_competition": (
        Advice(
            ("ensemble", "multiloss"),
            "Little for a balancing method to fix: on AV-Digits, where joint already matches "
            "the ensemble, no method of the MCR paper's Table 1 differed from joint after "
            "Holm's correction (docs/results.md). A comparison with the ensemble and multi-loss "
            "training confirms it on more seeds.",
        ),
    ),
    "one_modality": (
        Advice(
            ("unimodal", "ensemble"),
            "Fusion has little to gain: compare joint with each modality alone and with the "
            "ensemble before balancing anything; a balancing method cannot add what the weaker "
            "modality does not carry.",
        ),
    ),
}


@dataclass
class Diagnosis:
    """What ``mmbalance diagnose`` found (see :func:`diagnose`)."""

    dataset: str
    task: str
    seeds: int
    evidence: RegimeEvidence
    verdict: Verdict
    imbalance_degree: Stat | None
    confidence: dict[str, Stat | None]  # each unimodal head's mean probability of the true class
    confidence_ratio: Stat | None  # strongest over weakest head (classification)
    fused_gain: Stat  # per seed: the better of ensemble and stacked probe - best alone
    curves: dict[str, Any]  # per modality: joint's and the ensemble's probe per epoch
    advice: list[Advice]
    command: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        ev = self.evidence

        def stat(s: Stat | None) -> dict[str, float] | None:
            if s is None:
                return None
            half = None if math.isnan(s.half_width) else s.half_width
            return {"mean": s.mean, "half_width": half, "n": s.n}

        def per(d: Mapping[str, Stat]) -> dict[str, Any]:
            return {m: stat(s) for m, s in d.items()}

        return {
            "dataset": self.dataset,
            "task": self.task,
            "seeds": self.seeds,
            "verdict": {"kind": self.verdict.kind, "sentence": self.verdict.sentence},
            "criteria": {
                "met": ev.met,
                "thresholds": {
                    "min_gap": MIN_GAP,
                    "gap_se_factor": GAP_SE_FACTOR,
                    "min_probe_deficit": MIN_PROBE_DEFICIT,
                    "min_fusion_gain": MIN_FUSION_GAIN,
                },
            },
            "joint": stat(ev.joint),
            "ensemble": stat(ev.ensemble),
            "alone": per(ev.alone),
            "ensemble_minus_joint": {**(stat(ev.gap) or {}), "p": ev.gap_p, "se": ev.gap_se},
            "stacked_probe": ev.stacked_probe,
            "fused_estimate": ev.fused_estimate,
            "fusion_gain": {**(stat(self.fused_gain) or {}), "criterion": ev.fusion_gain},
            "weak": ev.weak,
            "probe_alone": per(ev.probe_alone),
            "probe_joint": per(ev.probe_joint),
            "probe_deficit": per(ev.probe_deficit),
            "shapley_joint": per(ev.shapley_joint),
            "imbalance_degree_joint": stat(self.imbalance_degree),
            "confidence_alone": per(self.confidence),
            "confidence_ratio": stat(self.confidence_ratio),
            "curves": self.curves,
            "advice": [{"methods": list(a.methods), "why": a.why} for a in self.advice],
            "command": self.command,
            "seconds": self.seconds,
        }


# --- running --------------------------------------------------------------------------------------
def _train(seeds: int, out_dir: Path, overrides: Mapping[str, Any]) -> list[RunSummary]:
    """The runs of the diagnosis, through the comparison engine (reused and resumed as
    ``compare`` does; ``OUT/results.json`` holds their records, no report is written)."""
    return run_comparison(list(RUNS), overrides, out_dir, seeds=seeds, report=False).runs


def estimate_seconds(cfg: ResolvedConfig, runs: int, measures: int = 0) -> float:
    """About how long ``runs`` runs of ``cfg``'s recipe and ``measures`` measurements of an
    ensemble (:func:`measure_ensemble`) take on this machine: a few timed training steps and one
    validation pass of ``joint``, scaled to the recipe's epochs, plus the end-of-run analysis
    (which encodes the training split once and the test split a few times) and, per
    measurement, one encoding of the training and test splits.
    """
    from mmbalance.train import Trainer

    cfg = cfg.with_train(devices=1, num_nodes=1, progress=False)
    fabric = make_fabric(cfg)
    fabric.seed_everything(cfg.train.seed, verbose=False)
    data = build_dataset(cfg)
    method, model, module = build_components(cfg, data)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(fabric, cfg, data, model, method, module, Path(tmp), callbacks=[])
        loader = trainer.loaders["train"]
        batches = iter(loader)
        started = time.perf_counter()
        trainer.train_step(next(batches).to(fabric.device), 0)  # warm-up: allocations
        step = time.perf_counter() - started  # an upper bound when it is the only step
        timed = min(3, len(loader) - 1)
        if timed > 0:
            started = time.perf_counter()
            for _ in range(timed):
                trainer.train_step(next(batches).to(fabric.device), 0)
            step = (time.perf_counter() - started) / timed
        started = time.perf_counter()
        trainer.evaluate("val")
        validation = time.perf_counter() - started
    sizes = {k: len(v) for k, v in data.splits.items()}
    per_sample = validation / max(sizes["val"], 1)
    analysis = per_sample * (sizes["train"] + (2 + len(data.modalities)) * sizes["test"])
    epoch = len(loader) * step + validation
    measure = per_sample * (sizes["train"] + sizes["test"])
    return runs * (cfg.train.epochs * epoch + analysis) + measures * measure


def _format_seconds(seconds: float) -> str:
    from mmbalance.train.callbacks import format_seconds

    return format_seconds(seconds)


def _say(text: str, progress: bool) -> None:
    if progress:
        print(f"diagnose: {text}", flush=True)


def diagnose(
    overrides: Mapping[str, Any],
    out_dir: str | Path,
    seeds: int = DEFAULT_SEEDS,
    command_options: Sequence[str] = (),
) -> Diagnosis:
    """Diagnose the dataset and recipe of ``overrides`` (``dataset``, ``dataset.KEY``,
    ``train.KEY``, ...; no ``method``) on ``seeds`` seeds into ``out_dir``: estimate the time,
    train (or reuse) ``joint`` and ``ensemble``, measure, decide, advise; writes
    ``diagnosis.json`` and ``diagnosis.md``. ``command_options`` (``--plugin FILE``) join the
    suggested ``compare`` command."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if "method" in overrides or any(k.startswith("method.") for k in overrides):
        raise ConfigError("diagnose trains joint and ensemble itself: give it no method")
    out_dir = Path(out_dir)
    cfg = resolve_config(dict(overrides))  # names and options checked before anything runs
    progress = cfg.train.progress
    started = time.perf_counter()
    todo = sum(
        not (out_dir / r / f"seed{s}" / "metrics.json").is_file()
        for r in RUNS
        for s in range(seeds)
    )
    data = build_dataset(cfg)
    if todo:
        estimate = estimate_seconds(cfg, todo, seeds)
        _say(
            f"{cfg.dataset.name}, {len(RUNS) * seeds} runs (joint and ensemble, {seeds} seeds; "
            f"{todo} to train): about {_format_seconds(estimate)}",
            progress,
        )
    runs = _train(seeds, out_dir, overrides)
    failed = [r for r in runs if not r.finished]
    if failed:
        first = failed[0]
        raise MMBalanceError(
            f"{len(failed)} run(s) of the diagnosis did not finish ({first.label} seed "
            f"{first.seed}: {first.message})"
        )
    _say("measuring the ensemble's encoders (stacked probe, confidences)", progress)
    numbers, confidence, gains = [], [], []
    for seed in range(seeds):
        extra = measure_ensemble(out_dir / "ensemble" / f"seed{seed}")
        numbers.append(seed_numbers(runs, seed, data.task, extra))
        confidence.append(extra["confidence"])
        best_alone = max(extra["alone"].values())
        fused = max(numbers[-1].ensemble, extra["stacked_probe"])
        gains.append(fused - best_alone)
    evidence = regime_evidence(numbers)
    found = verdict(evidence)
    degree = describe([_value(runs, "joint", s, "imbalance_degree") for s in range(seeds)])
    conf = {m: describe([c[m] for c in confidence]) for m in confidence[0]}
    ratio = None
    if conf:
        ratio = describe([max(c.values()) / max(min(c.values()), 1e-12) for c in confidence])
    curves = modality_curves(out_dir, seeds)
    advice = advice_for(found.kind, cfg.train.optimizer)
    command = compare_command(overrides, advice, evidence, out_dir, command_options)
    result = Diagnosis(
        dataset=cfg.dataset.name,
        task=data.task,
        seeds=seeds,
        evidence=evidence,
        verdict=found,
        imbalance_degree=degree,
        confidence=conf,
        confidence_ratio=ratio,
        fused_gain=regime_stat(gains),
        curves=curves,
        advice=advice,
        command=command,
        seconds=time.perf_counter() - started,
    )
    figure = None
    if curves:
        histories = _histories(out_dir, seeds)
        figure = plot_modality_curves(histories, out_dir / "diagnosis_curves.png", {}, list(RUNS))
    write_json_atomic(out_dir / "diagnosis.json", result.to_json(), indent=1)
    write_text_atomic(out_dir / "diagnosis.md", render_markdown(result, figure))
    return result


def _value(runs: Sequence[RunSummary], method: str, seed: int, metric: str) -> float:
    """The test ``metric`` of the finished ``method`` run of ``seed``."""
    for run in runs:
        if (run.label, run.seed) == (method, seed) and metric in run.metrics.get("test", {}):
            return float(run.metrics["test"][metric])
    raise MMBalanceError(f"the {method} run of seed {seed} recorded no test {metric}")


def seed_numbers(
    runs: Sequence[RunSummary], seed: int, task: str, extra: Mapping[str, Any]
) -> SeedNumbers:
    """One seed's numbers for the criteria: joint's and the ensemble's test metrics, and what
    :func:`measure_ensemble` measured on the ensemble's encoders (each modality alone, the
    stacked probe)."""
    score = "accuracy" if task == "classification" else "binary_accuracy"
    modalities = list(extra["alone"])
    return SeedNumbers(
        joint=_value(runs, "joint", seed, score),
        ensemble=_value(runs, "ensemble", seed, score),
        alone=dict(extra["alone"]),
        probe_alone={m: _value(runs, "ensemble", seed, f"probe_accuracy_{m}") for m in modalities},
        probe_joint={m: _value(runs, "joint", seed, f"probe_accuracy_{m}") for m in modalities},
        shapley_joint={m: _value(runs, "joint", seed, f"shapley_{m}") for m in modalities},
        stacked_probe=float(extra["stacked_probe"]),
    )


@torch.no_grad()
def measure_ensemble(run_dir: Path) -> dict[str, Any]:
    """On the ensemble run's selected weights (``best.ckpt``): each modality's head accuracy
    on test (the modality alone), the stacked probe (fitted on the training split's latents,
    scored on test), and each head's mean probability of the true class (classification)."""
    from mmbalance.train.runner import load_run

    trainer = load_run(run_dir / "best.ckpt")
    trainer.module.eval()
    model, method, data = trainer.model, trainer.method, trainer.data

    def encode(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return method.encode_eval(model, inputs)

    z_train, y_train = latents_of(model, data.splits["train"], encode=encode)
    z_test, y_test = latents_of(model, data.splits["test"], encode=encode)
    stacked = stacked_probe_accuracy(z_train, y_train, z_test, y_test, task=data.task)
    device = next(model.parameters()).device
    heads = model.heads({m: z.to(device) for m, z in z_test.items()}).unimodal_logits
    outcome = OUTCOMES.get(data.task)
    alone = {m: outcome.accuracy(u.cpu(), y_test) for m, u in heads.items()}
    confidence: dict[str, float] = {}
    if data.task == "classification":
        for m, u in heads.items():
            probs = u.float().softmax(-1).cpu()
            confidence[m] = float(probs[torch.arange(len(y_test)), y_test.long()].mean())
    return {"alone": alone, "stacked_probe": stacked, "confidence": confidence}


def _histories(out_dir: Path, seeds: int) -> dict[tuple[str, int], list[dict[str, float]]]:
    out = {}
    for run in RUNS:
        for seed in range(seeds):
            rows = read_history(out_dir / run / f"seed{seed}" / "metrics.csv")
            if rows:
                out[(run, seed)] = rows
    return out


def stall_epoch(curve: Sequence[float], stall: float = STALL) -> int | None:
    """The first epoch (from 0) after which the curve never again gains ``stall`` over its
    value there; ``None`` for an empty curve."""
    values = [v for v in curve if not math.isnan(v)]
    for epoch, value in enumerate(values):
        if max(values[epoch:]) - value < stall:
            return epoch
    return None


def modality_curves(out_dir: Path, seeds: int) -> dict[str, Any]:
    """Per modality: the mean over seeds of the validation probe per epoch, inside joint and
    alone (the ensemble's encoders), and the epoch each stops rising (:func:`stall_epoch`); empty
    when the runs have no per-epoch curves (``train.epoch_curves=false``)."""
    histories = _histories(out_dir, seeds)
    out: dict[str, Any] = {}
    for run, key in (("joint", "joint"), ("ensemble", "alone")):
        per_seed = [rows for (r, _), rows in histories.items() if r == run]
        if not per_seed:
            return {}
        columns = [c for c in per_seed[0][0] if c.startswith("val_probe_acc_")]
        for column in columns:
            modality = column.removeprefix("val_probe_acc_")
            epochs = min(len(rows) for rows in per_seed)
            curve = [statistics.fmean(rows[e][column] for rows in per_seed) for e in range(epochs)]
            entry = out.setdefault(modality, {})
            entry[key] = curve
            entry[f"{key}_stalls_at"] = stall_epoch(curve)
    return out


# --- advice ---------------------------------------------------------------------------------------
def advice_for(kind: str, optimizer: str) -> list[Advice]:
    """The steps of :data:`ADVICE` for a verdict; SGD-only steps only when training with SGD."""
    return [a for a in ADVICE[kind] if not a.sgd_only or optimizer == "sgd"]


def suggested_seeds(evidence: RegimeEvidence, family: int) -> int | None:
    """Seeds for a method that closes half of the joint-to-ensemble gap to be significant after
    Holm's correction over ``family`` methods (80 % chance, at the gap's paired spread), within
    :data:`SUGGESTED_SEEDS`; ``None`` when the spread is unknown (one seed)."""
    gap = evidence.gap
    if gap.n < 2 or gap.mean <= 0:
        return None
    seeds = seeds_for_significance(gap.mean / 2, gap.std, family)
    low, high = SUGGESTED_SEEDS
    return high if seeds is None else min(max(seeds, low), high)


def compare_command(
    overrides: Mapping[str, Any],
    advice: Sequence[Advice],
    evidence: RegimeEvidence,
    out_dir: Path,
    options: Sequence[str] = (),
) -> str:
    """The ``mmbalance compare`` command for the advised methods, with ``joint`` first and the
    diagnosis's dataset and options (without those that only change what is displayed)."""
    methods = ["joint"]
    for step in advice:
        methods += [m for m in step.methods if m not in methods]
    if "ensemble" not in methods:
        methods.insert(1, "ensemble")
    seeds = suggested_seeds(evidence, len(methods) - 1) or DEFAULT_SEEDS
    parts = ["mmbalance", "compare", *options]
    given = dict(overrides)
    if "dataset" in given:
        parts += ["--dataset", str(given.pop("dataset"))]
    parts += ["--methods", ",".join(methods), "--seeds", str(seeds)]
    parts += ["--out", str(out_dir.parent / f"{out_dir.name}-compare")]
    shown = {
        k: v
        for k, v in given.items()
        if k not in PRESENTATION_KEYS and f"train.{k}" not in PRESENTATION_KEYS
    }
    parts += [f"{k}={value_text(v)}" for k, v in shown.items()]
    return " ".join(shlex.quote(p) for p in parts)


# --- output ---------------------------------------------------------------------------------------
def numbers_table(d: Diagnosis) -> Table:
    """The measured numbers, each with its 95 % interval over seeds."""
    ev = d.evidence
    rows = [[f"{m} alone", fmt_stat(s, 3)] for m, s in ev.alone.items()]
    rows += [
        ["joint", fmt_stat(ev.joint, 3)],
        ["ensemble of the unimodal models", fmt_stat(ev.ensemble, 3)],
    ]
    gap = points_interval(ev.gap)
    if not math.isnan(ev.gap_p):
        gap += f", paired p = {ev.gap_p:.2g}"
    rows.append(["ensemble − joint (paired)", gap])
    if ev.stacked_probe is not None:
        rows.append(["stacked probe on the unimodal encoders", f"{ev.stacked_probe:.3f}"])
    rows.append(["fused gain over the best modality alone", points_interval(d.fused_gain)])
    for m in ev.modalities:
        rows.append(
            [
                f"{m} probe: alone / inside joint",
                f"{ev.probe_alone[m].mean:.3f} / {ev.probe_joint[m].mean:.3f}",
            ]
        )
        rows.append([f"{m} probe deficit inside joint", points_interval(ev.probe_deficit[m])])
    rows += [[f"Shapley {m} in joint", fmt_stat(s, 3)] for m, s in ev.shapley_joint.items()]
    rows.append(["imbalance degree of joint", fmt_stat(d.imbalance_degree, 3)])
    if d.confidence:
        rows += [[f"{m} head confidence (alone)", fmt_stat(s, 3)] for m, s in d.confidence.items()]
        rows.append(["confidence ratio, strongest / weakest", fmt_stat(d.confidence_ratio, 2)])
    for m, curve in d.curves.items():
        joint_at, alone_at = curve.get("joint_stalls_at"), curve.get("alone_stalls_at")
        if joint_at is None or not curve.get("joint"):
            continue
        text = f"joint's stops rising after epoch {joint_at} ({curve['joint'][joint_at]:.2f})"
        if alone_at is not None and curve.get("alone"):
            text += f"; alone after epoch {alone_at} ({curve['alone'][alone_at]:.2f})"
        rows.append([f"{m} validation probe", text])
    columns = [
        Column("measured", "left", essential=True),
        Column("value (mean ± 95 % CI over seeds)", "left", essential=True, wrap=True),
    ]
    notes = [
        f"{d.seeds} seed{'s' if d.seeds > 1 else ''} of joint and of the ensemble (test "
        "split). Alone: the ensemble's head and encoder of that modality; probes: linear "
        "probes on each frozen encoder; weak modality: the smaller Shapley value in joint "
        f"({ev.weak}). Epochs count from 0."
    ]
    if d.task == "regression":
        notes.append("Accuracy: the binary accuracy of the sign of the prediction (Acc-2).")
    return Table(columns, rows, f"Diagnosis of {d.dataset}", notes)


def criteria_lines(d: Diagnosis) -> list[str]:
    """Which criteria hold, in words, with their thresholds."""
    met = d.evidence.met
    mark = {True: "yes", False: "no"}
    return [
        f"joint below the ensemble by >= {100 * MIN_GAP:.0f} points and > {GAP_SE_FACTOR:g} "
        f"standard errors: {mark[met['gap']]}",
        f"weak modality's probe >= {100 * MIN_PROBE_DEFICIT:.0f} points lower inside joint "
        f"than alone: {mark[met['probe']]}",
        f"fused estimate >= {100 * MIN_FUSION_GAIN:.0f} points above the best modality alone: "
        f"{mark[met['complementary']]}",
    ]


def advice_lines(d: Diagnosis) -> list[str]:
    """The numbered steps of what to try next."""
    lines = []
    for i, step in enumerate(d.advice, 1):
        lines.append(f"{i}. {', '.join(step.methods)}: {step.why}")
    if d.verdict.kind == "competition" and not any(a.sgd_only for a in d.advice):
        lines.append(
            f"{len(d.advice) + 1}. Gradient-modulation methods (ogm_ge, mlb, pmr) only with "
            "train.optimizer=sgd: under Adam they did not help in the competition regime study."
        )
    return lines


def render_text(d: Diagnosis, width: int | None = None) -> str:
    """What the terminal prints."""
    out = [to_text(numbers_table(d), width), ""]
    out += ["Criteria (mmbalance.report.regime):", *(f"  {line}" for line in criteria_lines(d))]
    seeds = d.seeds
    caution = (
        f" ({seeds} seed{'s' if seeds > 1 else ''}: a screening; the regime search "
        "confirmed its settings on 5)"
        if seeds < 5
        else ""
    )
    out += ["", f"Verdict: {d.verdict.sentence}.{caution}", "", "What to try next:"]
    out += advice_lines(d)
    out += ["", "Compare them:", f"  {d.command}"]
    return "\n".join(out)


def render_markdown(d: Diagnosis, figure: Path | None) -> str:
    lines = [f"# Diagnosis of {d.dataset}", "", f"**Verdict: {d.verdict.sentence}.**", ""]
    lines += [to_markdown(numbers_table(d)), ""]
    lines += ["## Criteria", "", *(f"- {line}" for line in criteria_lines(d)), ""]
    if figure is not None:
        lines += [
            "## Per-modality curves over epochs",
            "",
            "Validation probe of each encoder per epoch, inside joint and in the ensemble (each "
            "modality alone), mean ± 95 % band over seeds.",
            "",
            f"![per-modality curves]({figure.name})",
            "",
        ]
    lines += ["## What to try next", "", *advice_lines(d), "", "```bash", d.command, "```", ""]
    return "\n".join(lines)
