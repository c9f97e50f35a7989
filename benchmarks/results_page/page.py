"""Write ``docs/results.md`` and its figures from the saved results (nothing is trained here).

Every table goes through the report's one table writer, every spread is a 95 % t interval over
seeds, and every "better than" is a paired t-test Holm-corrected over the methods compared with
the same reference (:mod:`mmbalance.report`).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.results_page import DOCS, RESULTS
from benchmarks.results_page.studies import SGD_ARM, STUDIES, Study
from mmbalance.io import write_text_atomic
from mmbalance.report import (
    Column,
    PairedTest,
    Table,
    calibration_table,
    describe,
    fmt_p,
    fmt_stat,
    paired_tests,
    plot_comparison,
    plot_modality_curves,
    robustness_table,
    to_markdown,
    unused_modalities,
)

#: The references every method is compared with, in the tables and the verdicts.
REFERENCES = ("joint", "ensemble")
#: The studies of the competition regime, shown first (the main study, then its SGD arm).
REGIME, REGIME_SGD = "av-fashion-cnn", "av-fashion-cnn-sgd"
#: Methods that are references or use one modality: not counted as balancing methods.
NOT_BALANCING = ("joint", "ensemble", "unimodal", "multiloss", "unipre_frozen", "unipre_finetuned")
#: How many balancing methods (best mean test accuracy first) the curves figure draws.
CURVE_METHODS = 6
ABSENT = "—"


def point_records(saved: Mapping[str, Any], study: str, point: str) -> list[dict[str, Any]]:
    return [r for r in saved["records"] if r["study"] == study and r["point"] == point]


def test_values(records: Iterable[Mapping[str, Any]], method: str, metric: str) -> list[float]:
    return [
        float(r["value"])
        for r in records
        if r["method"] == method and r["metric"] == metric and r["split"] == "test"
    ]


def _methods(records: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["method"]) for r in records))


def _delta(test: PairedTest | None) -> list[str]:
    """Δ (mean ± 95 % CI, bold when significant after Holm) and its Holm-adjusted p-value."""
    if test is None:
        return ["–", "–"]
    delta = f"{test.mean_diff:+.4f}"
    if test.n > 1:
        delta += f" ± {test.half_width:.4f}"
    return [f"**{delta}**" if test.significant else delta, fmt_p(test.p_holm)]


def accuracy_table(records: Sequence[Mapping[str, Any]], chosen: Mapping[str, str]) -> Table:
    """One row per method: the chosen hyperparameter, test accuracy, gap to Bayes, macro-F1, the
    paired differences to ``joint`` and ``ensemble`` with Holm-adjusted p-values, divergences."""
    methods = _methods(records)
    bayes = [float(r["value"]) for r in records if r["metric"] == "bayes_accuracy"]
    paired = {ref: paired_tests(records, "accuracy", ref) for ref in REFERENCES}
    columns = [Column("method", "left"), Column("chosen", "left"), Column("test accuracy")]
    columns += [Column("gap to Bayes")] if bayes else []
    columns.append(Column("macro-F1"))
    for ref in REFERENCES:
        columns += [Column(f"Δ vs {ref}"), Column("p (Holm)")]
    columns.append(Column("diverged"))
    rows = []
    for method in methods:
        acc = describe(test_values(records, method, "accuracy"))
        row = [f"`{method}`", chosen.get(method, "-"), fmt_stat(acc)]
        if bayes:
            row.append("-" if acc is None else f"{bayes[0] - acc.mean:.4f}")
        row.append(fmt_stat(describe(test_values(records, method, "macro_f1"))))
        for ref in REFERENCES:
            row += ["(reference)", "–"] if method == ref else _delta(paired[ref].get(method))
        failures = test_values(records, method, "diverged")
        row.append(f"{int(sum(failures))}/{len(failures)}")
        rows.append(row)
    return Table(columns, rows)


def learned_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """One row per method: linear-probe accuracy of each encoder, Shapley value of each modality,
    routing and synergy rates (with the test samples per seed they rest on, where recorded)."""
    methods = _methods(records)
    metrics = list(dict.fromkeys(str(r["metric"]) for r in records))
    probes = [m for m in metrics if m.startswith("probe_accuracy_")]
    shapley = [m for m in metrics if m.startswith("shapley_")]
    unused = unused_modalities(records)
    counted = "synergy_samples" in metrics
    columns = [Column("method", "left")]
    columns += [Column(f"probe {p.removeprefix('probe_accuracy_')}") for p in probes]
    columns += [Column(f"Shapley {s.removeprefix('shapley_')}") for s in shapley]
    columns.append(Column("routing"))
    columns += [Column("samples: some right")] if counted else []
    columns.append(Column("synergy"))
    columns += [Column("samples: all wrong")] if counted else []
    rows = []
    for method in methods:
        skip = unused.get(method, set())
        row = [f"`{method}`"]
        for key in probes + shapley:
            modality = key.removeprefix("probe_accuracy_").removeprefix("shapley_")
            stat = describe(test_values(records, method, key))
            row.append(ABSENT if modality in skip else fmt_stat(stat, 3))
        for rate, samples in (
            ("routing_rate", "routing_samples"),
            ("synergy_rate", "synergy_samples"),
        ):
            row.append(fmt_stat(describe(test_values(records, method, rate)), 3))
            if counted:
                row.append(" / ".join(f"{v:.0f}" for v in test_values(records, method, samples)))
        rows.append(row)
    return Table(columns, rows)


def missing_rules_of(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``{label: how its method predicts without a modality}`` for the labels of ``records``
    (a label is a method name, possibly followed by its options in brackets)."""
    from mmbalance.methods import METHODS

    names = {label: label.split("[")[0] for label in _methods(records)}
    return {label: METHODS.get(name).missing_modality for label, name in names.items()}


def beyond_accuracy_tables(records: Sequence[Mapping[str, Any]]) -> list[Table]:
    """Calibration (balanced accuracy, ECE) and robustness to a missing or noisy modality, for
    the runs that recorded them (the report's tables, :mod:`mmbalance.report`)."""
    tables = [
        calibration_table(records),
        robustness_table(records, "missing", missing_rules_of(records)),
        robustness_table(records, "noisy"),
    ]
    return [t for t in tables if t is not None]


def summary_table(saved: Mapping[str, Any]) -> Table:
    """Test accuracy (mean ± 95 % CI) of every method in every study's headline setting (the
    search point), with the Bayes accuracy where it is known; bold: the highest mean."""
    studies: list[tuple[str, list[dict[str, Any]]]] = []
    for study in STUDIES:
        point = study.points[study.search]
        records = point_records(saved, study.name, point.name)
        if not records:
            continue
        bayes = [float(r["value"]) for r in records if r["metric"] == "bayes_accuracy"]
        title = study.title.split(":")[0] + (f" ({point.name})" if len(study.points) > 1 else "")
        title += f", Bayes {bayes[0]:.4f}" if bayes else ""
        studies.append((title, records))
    methods = list(dict.fromkeys(m for _, recs in studies for m in _methods(recs)))
    stats = [
        {m: describe(test_values(recs, m, "accuracy")) for m in methods} for _, recs in studies
    ]
    best = [max((s.mean for s in col.values() if s), default=None) for col in stats]
    columns = [Column("method", "left"), *(Column(title) for title, _ in studies)]
    rows = []
    for method in methods:
        cells = [f"`{method}`"]
        for col, top in zip(stats, best, strict=True):
            stat = col[method]
            cell = fmt_stat(stat) if stat else "-"
            cells.append(f"**{cell}**" if stat and stat.mean == top else cell)
        rows.append(cells)
    return Table(columns, rows)


def verdict(records: Sequence[Mapping[str, Any]]) -> str:
    """One honest sentence per reference: which methods differ from it beyond the seed noise
    (paired t-test, Holm-corrected over the methods compared with it)."""
    parts = []
    for ref in REFERENCES:
        table = paired_tests(records, "accuracy", ref)
        if not table:
            continue
        better = sorted(m for m, p in table.items() if p.significant and p.mean_diff > 0)
        worse = sorted(m for m, p in table.items() if p.significant and p.mean_diff < 0)
        level = [m for m, p in table.items() if not p.significant]
        parts.append(
            f"Against `{ref}`: significantly better: "
            f"{', '.join(f'`{m}`' for m in better) or 'none'}; significantly worse: "
            f"{', '.join(f'`{m}`' for m in worse) or 'none'}; "
            f"{len(level)} not distinguishable from it."
        )
    return " ".join(parts)


def plot_sweep(saved: Mapping[str, Any], study: Study, path: Path) -> Path:
    """Gap to Bayes and the weak encoder's probe accuracy along the sweep, per method (mean ±
    95 % CI over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in saved["records"] if r["study"] == study.name]
    methods = _methods(records)
    # dashed: the references and the methods that use only some modalities
    unused = unused_modalities(records)
    dashed = {m for m in methods if m in REFERENCES or unused.get(m)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [p.x for p in study.points]
    colors = plt.get_cmap("tab20").colors  # 12+ methods: the default 10-colour cycle repeats
    for index, method in enumerate(methods):
        for ax, metric in zip(axes, ("gap", "probe_accuracy_m2"), strict=True):
            if metric == "probe_accuracy_m2" and "m2" in unused.get(method, set()):
                continue  # the m2 encoder of a method that ignores m2 is untrained
            means, halves = [], []
            for point in study.points:
                rec = [r for r in records if r["point"] == point.name]
                if metric == "gap":
                    bayes = test_values(rec, method, "bayes_accuracy")
                    acc = test_values(rec, method, "accuracy")
                    vals = [b - a for b, a in zip(bayes, acc, strict=False)]
                else:
                    vals = test_values(rec, method, metric)
                stat = describe(vals)
                means.append(stat.mean if stat else math.nan)
                halves.append(0.0 if stat is None or stat.n < 2 else stat.half_width)
            style = "--" if method in dashed else "-"
            ax.errorbar(
                xs,
                means,
                yerr=halves,
                marker="os^Dv<>p*hX"[index % 11],
                color=colors[(2 * index) % 20 + (2 * index) // 20],
                capsize=2,
                linestyle=style,
                label=method,
            )
    axes[0].set_ylabel("gap to Bayes accuracy (test)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("linear-probe accuracy of the weak encoder (m2)")
    for ax in axes:
        ax.set_xlabel(study.x_label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{study.title} (mean ± 95 % CI over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_docs(
    saved: Mapping[str, Any] | None,
    cost: Sequence[Mapping[str, Any]] | None,
    docs: Path = DOCS,
    results: Path = RESULTS,
    draw: bool = True,
) -> Path:
    """Write ``docs/results.md`` (and, with ``draw``, its figures) from saved results."""
    import torch

    import mmbalance

    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    out: list[str] = [
        "# Results: what each method costs and what it buys",
        "",
        "Regenerated by one command (a few hours on 2 CPU cores; `--stage` and `--studies` "
        "regenerate parts and keep the rest):",
        "",
        "```bash",
        "python3 benchmarks/run_results.py",
        "```",
        "",
        f"Generated {date.today().isoformat()} with mmbalance {mmbalance.__version__}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, on {os.cpu_count()} CPU cores "
        f"({platform.machine()}). Everything below comes from `benchmarks/results/` "
        "(`cost_cpu.json`, `accuracy.json`); nothing is edited by hand.",
        "",
    ]
    out += _regime_section(saved, figures, draw)
    out += _cost_section(cost, results)
    if saved is not None:
        out += _accuracy_sections(saved, figures, draw)
    path = docs / "results.md"
    write_text_atomic(path, "\n".join(out) + "\n")
    return path


def _is_balancing(method: str) -> bool:
    return method.split("[")[0] not in NOT_BALANCING


def epoch_cost(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, float]:
    """Each method's epoch time divided by ``joint``'s: the median over seeds of the mean
    ``seconds`` per epoch of ``metrics.csv`` (wall time, so it includes every epoch hook and
    feature pass a method runs, and the load of the other training processes)."""
    per_method: dict[str, list[float]] = {}
    for key, rows in curves.items():
        seconds = [r["seconds"] for r in rows if "seconds" in r and not math.isnan(r["seconds"])]
        if seconds:
            per_method.setdefault(key.rsplit("|", 1)[0], []).append(sum(seconds) / len(seconds))
    medians = {m: sorted(v)[len(v) // 2] for m, v in per_method.items()}
    joint = medians.get("joint")
    return {m: v / joint for m, v in medians.items()} if joint else {}


def gap_table(
    records: Sequence[Mapping[str, Any]], cost: Mapping[str, float] | None = None
) -> tuple[Table, str]:
    """How much of the joint-to-ensemble gap each method closes, and a plain-words summary.

    ``closed`` = (method - joint) / (ensemble - joint) of the mean test accuracies: 0 % is
    joint, 100 % the ensemble. "Above joint" and "below the ensemble" are the paired t-tests of
    :func:`accuracy_table` (Holm over every method compared with the same reference)."""
    means = {m: describe(test_values(records, m, "accuracy")) for m in _methods(records)}
    joint, ensemble = means.get("joint"), means.get("ensemble")
    if joint is None or ensemble is None:
        return Table([Column("method", "left")], []), "The references are missing."
    gap = ensemble.mean - joint.mean
    vs_joint = paired_tests(records, "accuracy", "joint")
    vs_ens = paired_tests(records, "accuracy", "ensemble")
    balancing = sorted(
        (m for m in means if _is_balancing(m) and means[m] is not None),
        key=lambda m: -means[m].mean,  # type: ignore[union-attr]
    )
    columns = [Column("method", "left"), Column("test accuracy"), Column("gap closed")]
    columns += [Column("vs joint", "left"), Column("vs ensemble", "left")]
    columns += [Column("epoch time ÷ joint")] if cost else []
    rows = []

    def verdict_cell(test: PairedTest | None, word_up: str, word_down: str) -> str:
        if test is None or not test.significant:
            return "level"
        return word_up if test.mean_diff > 0 else word_down

    baselines = sorted(
        (
            m
            for m in means
            if means[m] is not None
            and not _is_balancing(m)
            and m not in ("joint", "ensemble")
            and not m.startswith("unimodal")
        ),
        key=lambda m: -means[m].mean,  # type: ignore[union-attr]
    )
    for m in ["joint", "ensemble", *baselines, *balancing]:
        stat = means[m]
        closed = (stat.mean - joint.mean) / gap if gap > 0 else math.nan  # type: ignore[union-attr]
        rows.append(
            [
                f"`{m}`",
                fmt_stat(stat),
                f"{100 * closed:.0f} %",
                "(reference)" if m == "joint" else verdict_cell(vs_joint.get(m), "above", "below"),
                "(reference)" if m == "ensemble" else verdict_cell(vs_ens.get(m), "above", "below"),
                *([f"{cost[m]:.2f}" if m in cost else "-"] if cost else []),
            ]
        )
    above = [m for m in balancing if (t := vs_joint.get(m)) and t.significant and t.mean_diff > 0]
    below = [m for m in balancing if (t := vs_joint.get(m)) and t.significant and t.mean_diff < 0]
    reach = [
        m for m in balancing if not ((t := vs_ens.get(m)) and t.significant and t.mean_diff < 0)
    ]
    names = lambda ms: ", ".join(f"`{m}`" for m in ms) or "none"  # noqa: E731

    def standing(m: str) -> str:
        j, e = vs_joint.get(m), vs_ens.get(m)
        word_j = (
            "level with"
            if j is None or not j.significant
            else ("above" if j.mean_diff > 0 else "below")
        )
        word_e = (
            "level with"
            if e is None or not e.significant
            else ("above" if e.mean_diff > 0 else "below")
        )
        return f"`{m}` {means[m].mean:.4f} ({word_j} joint, {word_e} the ensemble)"  # type: ignore[union-attr]

    best = balancing[0] if balancing else None
    summary = (
        f"Joint training reaches {joint.mean:.4f} and the ensemble of separately trained "
        f"unimodal models {ensemble.mean:.4f}: a gap of {100 * gap:.1f} points. Of the "
        f"{len(balancing)} balancing methods, {len(above)} are significantly above joint "
        f"({names(above)}), {len(below)} significantly below it ({names(below)}), and the rest "
        f"are level with it. Not significantly below the ensemble: {names(reach)}."
    )
    if best is not None:
        best_stat = means[best]
        summary += (
            f" The best mean is `{best}`'s, {best_stat.mean:.4f}, "  # type: ignore[union-attr]
            f"closing {100 * (best_stat.mean - joint.mean) / gap:.0f} % of the gap."  # type: ignore[union-attr]
            if gap > 0
            else ""
        )
    if baselines:
        summary += " The baselines: " + "; ".join(standing(m) for m in baselines) + "."
    return Table(columns, rows), summary


#: The share of test samples without a modality in the robustness study.
ROBUSTNESS_PCT = 50


def robustness_study(records: Sequence[Mapping[str, Any]]) -> tuple[Table, str] | None:
    """Without each modality for half of the test samples: every method's accuracy, its paired
    difference to joint's (Holm over the methods compared), and a plain-words paragraph on which
    methods make the model depend less on its dominant modality (the one with the larger
    Shapley value in joint); ``None`` when the runs did not record it."""
    pct = ROBUSTNESS_PCT
    shapley = {
        key.removeprefix("shapley_"): describe(test_values(records, "joint", key))
        for key in dict.fromkeys(str(r["metric"]) for r in records)
        if key.startswith("shapley_")
    }
    modalities = [m for m in shapley if test_values(records, "joint", f"missing_{m}_{pct}")]
    if not modalities or shapley.get(modalities[0]) is None:
        return None
    dominant = max(modalities, key=lambda m: shapley[m].mean)  # type: ignore[union-attr]
    weak = [m for m in modalities if m != dominant]
    order = [dominant, *weak]
    tests = {m: paired_tests(records, f"missing_{m}_{pct}", "joint") for m in order}
    rules = missing_rules_of(records)
    columns = [Column("method", "left"), Column("missing modality means", "left")]
    columns.append(Column("test accuracy"))
    for m in order:
        columns += [Column(f"{m} missing {pct} %"), Column("Δ vs joint"), Column("p (Holm)")]
    rows = []
    methods = _methods(records)
    for method in methods:
        row = [f"`{method}`", rules.get(method, "–")]
        row.append(fmt_stat(describe(test_values(records, method, "accuracy")), 3))
        for m in order:
            row.append(fmt_stat(describe(test_values(records, method, f"missing_{m}_{pct}")), 3))
            row += ["(reference)", "–"] if method == "joint" else _delta(tests[m].get(method))
        rows.append(row)

    def mean(method: str, metric: str) -> float:
        stat = describe(test_values(records, method, metric))
        return stat.mean if stat is not None else math.nan

    balancing = [m for m in methods if _is_balancing(m)]
    test = tests[dominant]
    better = [m for m in balancing if (t := test.get(m)) and t.significant and t.mean_diff > 0]
    worse = [m for m in balancing if (t := test.get(m)) and t.significant and t.mean_diff < 0]
    names = lambda ms: ", ".join(f"`{m}`" for m in ms) or "none"  # noqa: E731
    key = f"missing_{dominant}_{pct}"
    joint_acc, joint_missing = mean("joint", "accuracy"), mean("joint", key)
    ranked = sorted(balancing, key=lambda m: -mean(m, key))
    smaller_drop = [
        m for m in balancing if mean(m, "accuracy") - mean(m, key) < joint_acc - joint_missing
    ]
    text = (
        f"Joint depends most on the {dominant} (Shapley value {shapley[dominant].mean:.2f}, "  # type: ignore[union-attr]
        + ", ".join(
            f"{m} {shapley[m].mean:.2f}"  # type: ignore[union-attr]
            for m in weak
        )
        + f"). With the {dominant} missing from {pct} % of the test samples, joint falls from "
        f"{joint_acc:.3f} to {joint_missing:.3f} ({100 * (joint_missing - joint_acc):+.1f} "
        "points)"
        + "".join(
            f"; with the {m} missing, to {mean('joint', f'missing_{m}_{pct}'):.3f}" for m in weak
        )
        + f". Without the {dominant}, {len(better)} of the {len(balancing)} balancing methods "
        f"keep significantly more accuracy than joint ({names(better)}) and {len(worse)} "
        f"significantly less ({names(worse)}); the rest are level with it (paired t-tests, Holm "
        f"over the methods compared). {len(smaller_drop)} lose less than joint's "
        f"{100 * (joint_acc - joint_missing):.1f} points from their own accuracy"
    )
    if ranked:
        top = ranked[0]
        text += f"; the highest accuracy without the {dominant} is `{top}`'s, {mean(top, key):.3f}"
    if "ensemble" in methods:
        text += (
            f". The ensemble, which without a modality averages the heads present, keeps "
            f"{mean('ensemble', key):.3f}"
        )
    return Table(columns, rows), text + "."


def optimizer_table(saved: Mapping[str, Any]) -> Table | None:
    """The methods of the SGD arm (the gradient-modulation methods and the 2025 methods) under
    Adam (the regime) and SGD: test accuracy and the paired difference to joint trained with the
    same optimizer."""
    arms = []
    for study in (REGIME, REGIME_SGD):
        point = next((s.points[s.search] for s in STUDIES if s.name == study), None)
        records = point_records(saved, study, point.name) if point else []
        if not records:
            return None
        arms.append(records)
    columns = [Column("method", "left")]
    for arm in ("Adam", "SGD"):
        columns += [
            Column(f"{arm}: test accuracy"),
            Column(f"{arm}: Δ vs joint"),
            Column("p (Holm)"),
        ]
    rows = []
    tests = [paired_tests(recs, "accuracy", "joint") for recs in arms]
    methods = [m for m in _methods(arms[1]) if m.split("[")[0] in SGD_ARM]
    for m in methods:
        row = [f"`{m}`"]
        for recs, test in zip(arms, tests, strict=True):
            row.append(fmt_stat(describe(test_values(recs, m, "accuracy"))))
            row += ["(reference)", "–"] if m == "joint" else _delta(test.get(m))
        rows.append(row)
    return Table(columns, rows)


def plot_regime_curves(
    saved: Mapping[str, Any], records: Sequence[Mapping[str, Any]], path: Path
) -> Path | None:
    """Per-modality validation curves of the references and the best balancing methods."""
    stored = saved.get("curves", {}).get(REGIME)
    if not stored:
        return None
    means = {m: describe(test_values(records, m, "accuracy")) for m in _methods(records)}
    balancing = sorted(
        (m for m, st in means.items() if st is not None and _is_balancing(m)),
        key=lambda m: -means[m].mean,  # type: ignore[union-attr]
    )
    shown = ["joint", "ensemble", *balancing[:CURVE_METHODS]]
    if "mcr" in means and "mcr" not in shown:
        shown.append("mcr")
    histories = {}
    for key, rows in stored.items():
        method, seed = key.rsplit("|", 1)
        if method in shown:
            histories[(method, int(seed))] = rows
    return plot_modality_curves(histories, path, unused_modalities(records), order=shown)


def final_probes(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """``{method: {modality: mean over seeds of the last epoch's validation probe}}``."""
    sums: dict[str, dict[str, list[float]]] = {}
    for key, rows in curves.items():
        if not rows:
            continue
        method = key.rsplit("|", 1)[0]
        for column, value in rows[-1].items():
            if column.startswith("val_probe_acc_") and not math.isnan(value):
                modality = column.removeprefix("val_probe_acc_")
                sums.setdefault(method, {}).setdefault(modality, []).append(value)
    return {m: {k: sum(v) / len(v) for k, v in by.items()} for m, by in sums.items()}


def _weak_probe_sentence(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """Where joint leaves its weakest encoder, against the other methods, from the curves."""
    probes = final_probes(curves)
    joint = probes.get("joint")
    if not joint:
        return ""
    weak = min(joint, key=joint.get)  # type: ignore[arg-type]
    others = [p[weak] for m, p in probes.items() if m != "joint" and weak in p and _is_balancing(m)]
    if not others:
        return ""
    higher = sum(v > joint[weak] for v in others)
    median = sorted(others)[len(others) // 2]
    return (
        f"At the last epoch joint's {weak} encoder has a validation probe of {joint[weak]:.2f}; "
        f"{higher} of the {len(others)} balancing methods end with a higher one (median "
        f"{median:.2f}). "
    )


def _regime_section(saved: Mapping[str, Any] | None, figures: Path, draw: bool) -> list[str]:
    """The page's first section: every method on the real-data competition regime."""
    study = next(s for s in STUDIES if s.name == REGIME)
    records = point_records(saved, REGIME, study.points[0].name) if saved else []
    out = ["## The competition regime: every method on AV-Fashion-CNN", ""]
    if not records:
        return [
            *out,
            "Not run yet: `python3 benchmarks/run_results.py --stage accuracy "
            "--studies av-fashion-cnn,av-fashion-cnn-sgd`.",
            "",
        ]
    info = saved.get("studies", {}).get(REGIME, saved) if saved else {}
    table, summary = gap_table(records, epoch_cost(saved.get("curves", {}).get(REGIME, {})))
    out += [
        study.description,
        "",
        "The regime criteria, fixed before any balancing method ran: joint at least 2 points below the ensemble beyond twice the "
        "standard error over 5 seeds; each modality alone between 0.45 and 0.85; the weak "
        "modality's linear probe at least 3 points lower inside joint than alone; a fusion "
        "that beats both modalities. The search table is in "
        "`benchmarks/results/av_regime_search.md`. Every method here ran "
        f"{info.get('seeds', '?')} seeds of the setting its validation search chose (the "
        "same budget of three candidates for every method; the test split is never used to "
        "choose).",
        "",
        f"**In plain words.** {summary}",
        "",
        to_markdown(table),
        "",
        "*gap closed*: (method − joint) / (ensemble − joint) of the mean test accuracies. *vs "
        "joint*, *vs ensemble*: the paired t-test over seeds, Holm-corrected over every method "
        "compared with the same reference (p < 0.05); *level*: no significant difference. "
        "*epoch time ÷ joint*: the median over seeds of the mean wall time of an epoch, "
        "divided by `joint`'s: it counts every epoch hook and extra pass a method runs "
        "(measured with two training processes sharing the machine; for the unimodal "
        "pre-training baselines, the epochs after pre-training). The per-step cost is in the "
        "Cost section.",
        "",
    ]
    fig = figures / "av-fashion-cnn_curves.png"
    if not draw or plot_regime_curves(saved, records, fig) is not None:
        out += [
            f"![Per-modality validation curves on AV-Fashion-CNN](figures/{fig.name})",
            "",
            f"Per-modality validation curves (linear probe of each encoder and each modality's "
            f"Shapley value, per epoch) of the references and the {CURVE_METHODS} best balancing "
            "methods (and `mcr`), mean ± 95 % band over seeds. "
            + _weak_probe_sentence(saved.get("curves", {}).get(REGIME, {}))
            + "`greedy`'s per-modality latents pass through its cross-modal blocks, so its "
            "per-modality heads and probes see the other modality too and are not comparable "
            "with the others'.",
            "",
        ]
    robust = robustness_study(records)
    if robust is not None:
        table, paragraph = robust
        out += [
            "### Robustness: a missing modality at test time",
            "",
            "Does a balancing method make the model depend less on its dominant modality, as "
            "many balancing papers claim? Every run of this study measured its test accuracy "
            f"with each modality missing from the same {ROBUSTNESS_PCT} % of the test samples "
            "(`mmbalance/eval/robustness.py`; each method's own rule for a missing modality, "
            "stated in the table).",
            "",
            f"**In plain words.** {paragraph}",
            "",
            to_markdown(table),
            "",
        ]
    opt = optimizer_table(saved) if saved else None
    if opt is not None:
        sgd = next(s for s in STUDIES if s.name == REGIME_SGD)
        out += [
            "### The optimizer axis: SGD against Adam",
            "",
            sgd.description + " Each arm has its own validation search and its own joint "
            "reference; the Δ is to joint trained with the same optimizer.",
            "",
            to_markdown(opt),
            "",
            "Which optimizer the results assume: every table of this page trains with the "
            "dataset's optimizer (Adam on AV-Fashion-CNN, SGD on the synthetic studies), for "
            "every method alike, except this section's SGD arm. The official code of OGM and "
            "OGM-GE, AGM and PMR trains with SGD (MSLR's ports use both, MLB's own code Adam), "
            "as do those of AUG, DGL and G2D and MIDAS's paper (Data Remixing's code: Adam). "
            "Under Adam the scaling of a whole encoder's gradient (OGM, OGM-GE, MLB) is "
            "largely undone by the per-parameter normalisation, and mmbalance says so at run "
            "start; MSLR's per-group learning rates and AGM's mixing of gradient paths are "
            "not undone by it.",
            "",
        ]
    out += ["### Every table of the regime", ""]
    out += _study_details(saved, study, figures, draw)  # type: ignore[arg-type]
    if opt is not None:
        out += ["### Every table of the SGD arm", ""]
        out += _study_details(
            saved, next(s for s in STUDIES if s.name == REGIME_SGD), figures, draw
        )  # type: ignore[arg-type]
    return out


def _demote(markdown: str, levels: int = 2) -> str:
    """Push a standalone page's headings down so that it nests under this page's sections."""
    return "\n".join(
        "#" * levels + line if line.startswith("#") else line for line in markdown.split("\n")
    )


def _cost_section(cost: Sequence[Mapping[str, Any]] | None, results: Path) -> list[str]:
    out = ["## Cost", ""]
    if not cost:
        return [
            *out,
            "No cost results yet: run `python3 benchmarks/run_results.py --stage cost`.",
            "",
        ]
    from benchmarks.cost.tables import cost_markdown

    out += [
        "Step time of each method divided by `joint`'s on the same model, batch and data, "
        "timed side by side (interleaved rounds, medians), with `Trainer.train_step`: exactly "
        "the step training runs. See `benchmarks/bench_cost.py` for the settings.",
        "",
        _demote(cost_markdown(cost)),
        "",
    ]
    # each measurement with compiled steps beside its eager one: ``cost_X_compiled.json``
    from benchmarks.cost.tables import compiled_table

    for done in sorted(results.glob("cost_*_compiled.json")):
        eager_path = done.with_name(done.name.replace("_compiled.json", ".json"))
        if not eager_path.is_file():
            continue
        table = compiled_table(json.loads(eager_path.read_text()), json.loads(done.read_text()))
        if not table.rows:
            continue
        out += [
            f"### Compiled against eager steps: `{eager_path.name}` and `{done.name}`",
            "",
            "`train.compile=true` (`torch.compile` of the step's forward and the method's "
            "losses) against eager steps, each timed against `joint` stepped the same way; "
            "*compiled ÷ eager ms*: the method's own step time compiled over eager (below 1: "
            "compiling pays per step); *steps to earn it back*: the compile time over the time "
            "saved per step, the number of steps a run must take before compiling saves time "
            "(what `train.compile=auto` weighs).",
            "",
            to_markdown(table),
            "",
        ]
    # further measurements saved beside it (another device, another batch): ``cost_<name>.json``
    for extra in sorted(results.glob("cost_*.json")):
        if extra.name == "cost_cpu.json":
            continue
        out += [
            f"### Also measured: `{extra.name}`",
            "",
            _demote(cost_markdown(json.loads(extra.read_text())), 3),
            "",
        ]
    return out


def _timing(saved: Mapping[str, Any]) -> str:
    """How long the accuracy stage took, and whether runs are missing (a partial regeneration)."""
    parts = [f"{saved.get('runs', '?')} training runs"]
    if saved.get("minutes") is not None:
        parts.append(
            f"the last invocation took {saved['minutes']:.0f} min on {saved['workers']} worker "
            "processes, reusing the runs earlier invocations had finished"
        )
    if saved.get("missing"):
        parts.append(f"**partial: {saved['missing']} runs missing**")
    return ", ".join(parts)


def search_table(saved: Mapping[str, Any]) -> Table:
    """The validation accuracy of every candidate of the search, and the chosen value."""
    columns = [Column("study", "left"), Column("method", "left"), Column("option", "left")]
    columns += [Column("candidates: validation accuracy", "left"), Column("chosen")]
    rows = []
    for s in saved["search"]:
        refused = s.get("refused", {})
        scores = ", ".join(
            f"{k}: {v:.4f}"
            if v is not None and v >= 0
            else f"{k}: {'refused' if k in refused else 'did not finish'}"
            for k, v in s["scores"].items()
        )
        rows.append([s["study"], f"`{s['method']}`", s["option"], scores, f"{s['chosen']:g}"])
    return Table(columns, rows)


def _accuracy_sections(saved: Mapping[str, Any], figures: Path, draw: bool) -> list[str]:
    counted = any(r["metric"] == "synergy_samples" for r in saved["records"])
    out = [
        "## Accuracy",
        "",
        "Test accuracy in each study's headline setting (mean ± 95 % confidence interval over "
        "seeds, Student's t; bold: the highest mean). The sections below give every setting, the "
        "paired differences, the probes, contributions and error analysis.",
        "",
        to_markdown(summary_table(saved)),
        "",
        f"Every method on {saved['seeds']} seeds per setting ({_timing(saved)}). Hyperparameters "
        "were chosen on the validation split only: each method had the same budget of three "
        "candidate values of its main hyperparameter, one run each (seed 0) at the study's "
        "search point; the table's *chosen* column gives the winner. Every ± is a 95 % "
        "confidence interval of the mean over seeds. Δ columns are paired differences of test "
        "accuracy on the same seeds; p is the two-sided paired t-test, Holm-adjusted over all "
        "methods compared with the same reference; **bold** Δ: significant (p < 0.05 after "
        "Holm). Probes are linear probes on each frozen encoder (test split), left out (—) for "
        "a modality the method does not use (Shapley value exactly 0 on every seed: its encoder "
        "is untrained, and so are its routing and synergy rates); Shapley values are each "
        "modality's contribution to test accuracy (latents permuted); routing and synergy "
        "follow the MCR paper's error analysis"
        + (
            ", with the test samples per seed each rate rests on."
            if counted
            else ". `accuracy.json` predates the recording of the number of test samples behind "
            "each rate (the next regeneration adds them); the synergy rate rests on the samples "
            "that every unimodal predictor gets wrong, a small group when they are accurate, so "
            "read it with care."
        ),
        "",
    ]
    for study in STUDIES:
        if study.name in (REGIME, REGIME_SGD):
            continue  # the page's first section
        if not any(r["study"] == study.name for r in saved["records"]):
            continue
        out += [f"### {study.title}", "", study.description, ""]
        out += _study_details(saved, study, figures, draw)
    out += ["## Hyperparameter search (validation accuracy, seed 0)", ""]
    out += [to_markdown(search_table(saved)), ""]
    return out


def _study_details(saved: Mapping[str, Any], study: Study, figures: Path, draw: bool) -> list[str]:
    """A study's tables: accuracy and paired differences, verdicts, probes and figures."""
    out: list[str] = []
    chosen_by: dict[str, str] = {}
    for s in saved["search"]:
        if s["study"] == study.name:
            value = f"{s['chosen']:g}" + ("x" if s["option"] == "train.lr" else "")
            chosen_by[s["method"]] = f"{s['option'].split('.')[-1]}={value}"
    if len(study.points) > 1:
        fig = figures / f"{study.name}_sweep.png"
        if draw:
            plot_sweep(saved, study, fig)
        out += [f"![{study.title}](figures/{fig.name})", ""]
    for point in study.points:
        records = point_records(saved, study.name, point.name)
        if not records:
            continue
        if len(study.points) > 1:
            out += [f"#### {point.name}", ""]
        out += [to_markdown(accuracy_table(records, chosen_by)), ""]
        out += [verdict(records), ""]
        out += [to_markdown(learned_table(records)), ""]
        for extra in beyond_accuracy_tables(records):
            out += [to_markdown(extra), ""]
        if len(study.points) == 1 or point == study.points[study.search]:
            slug = f"{study.name}_{point.name}".replace("=", "").replace(".", "")
            fig = figures / f"{slug}.png"
            if not draw or plot_comparison(records, fig) is not None:
                out += [f"![{study.title} {point.name}](figures/{fig.name})", ""]
    return out
