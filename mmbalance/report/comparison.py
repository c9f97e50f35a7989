"""The tables of a comparison, built from records: the headline comparison, the modality
contributions, the error analysis, and each method's options and cost.

Every spread is a 95 % t interval over seeds and every difference to the reference is a paired
t-test with Holm correction (:mod:`mmbalance.report.stats`). Column titles are human-readable
(:func:`metric_title`), never raw metric keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mmbalance.errors import ConfigError, DataError
from mmbalance.methods import METHODS
from mmbalance.report.records import (
    DIVERGED,
    failed_runs,
    methods_of,
    modalities_of,
    unused_modalities,
)
from mmbalance.report.stats import (
    ALPHA,
    LEVEL,
    MAX_SEEDS,
    PairedTest,
    Stat,
    describe,
    paired_tests,
    required_ratio,
    seeds_for_significance,
    summarize,
)
from mmbalance.report.tables import Column, Table

#: The method every other one is compared with, when it was run.
REFERENCE = "joint"
#: How metric keys read in a table or on an axis.
METRIC_TITLES = {
    "accuracy": "test accuracy",
    "macro_f1": "macro-F1",
    "mae": "MAE",
    "pearson": "Pearson r",
    "binary_accuracy": "sign accuracy",
    "imbalance_degree": "imbalance degree",
    "routing_rate": "routing rate",
    "synergy_rate": "synergy rate",
    "bayes_accuracy": "Bayes accuracy",
    "balanced_accuracy": "balanced accuracy",
    "ece": "ECE",
}
#: Names of ``--metrics`` that stand for one column per modality: ``probe`` (the linear probe of
#: each encoder), ``head`` (each unimodal head's accuracy), ``head_ece`` (its calibration error),
#: ``shapley`` (each modality's Shapley value).
METRIC_GROUPS = {
    "probe": "probe_accuracy_",
    "head": "unimodal_accuracy_",
    "head_ece": "unimodal_ece_",
    "shapley": "shapley_",
}
#: ``missing_50`` / ``noisy_50``: one column per modality at that rate
#: (:mod:`mmbalance.eval.robustness`); ``robust_50``: the worst modality's ``missing`` at 50 %.
_RATE_GROUP = re.compile(r"(?P<kind>missing|noisy)_(?P<pct>\d+)")
_RATE_KEY = re.compile(r"(?P<kind>missing|noisy)_(?P<modality>.+)_(?P<pct>\d+)")
_ROBUST_KEY = re.compile(r"robust_(?P<pct>\d+)")
#: Headline metrics per task, the columns unless ``--metrics`` picks others; the first is the
#: one compared with the reference.
CLASSIFICATION = ("accuracy", "macro_f1")
REGRESSION = ("mae", "pearson", "binary_accuracy")
#: Shown in place of a number that does not exist (a modality the method does not use).
ABSENT = "—"
#: A rate resting on fewer samples per seed than this is marked.
FEW_SAMPLES = 30


def metric_title(key: str, regression: bool = False) -> str:
    """``probe_accuracy_m1`` -> ``probe m1``, ``shapley_m1`` -> ``Shapley m1``, and the names of
    :data:`METRIC_TITLES` (a regression probe is scored on the sign of the target)."""
    if key.startswith("probe_accuracy_"):
        what = "probe sign acc" if regression else "probe"
        return f"{what} {key.removeprefix('probe_accuracy_')}"
    if key.startswith("shapley_"):
        return f"Shapley {key.removeprefix('shapley_')}"
    if key.startswith("unimodal_accuracy_"):
        return f"head {key.removeprefix('unimodal_accuracy_')}"
    if key.startswith("unimodal_ece_"):
        return f"ECE head {key.removeprefix('unimodal_ece_')}"
    if match := _ROBUST_KEY.fullmatch(key):
        return f"worst missing {match['pct']} %"
    if match := _RATE_KEY.fullmatch(key):
        return f"{match['modality']} {match['kind']} {match['pct']} %"
    return METRIC_TITLES.get(key, key.replace("_", " "))


def parse_metrics(text: str) -> list[str]:
    """The column names of ``--metrics a,b,c``, checked before anything trains: metric keys of
    the runs (``accuracy``, ``macro_f1``, ``balanced_accuracy``, ``ece``, ``robust_50``,
    ``missing_audio_50``, ``probe_accuracy_audio``, ...) or the names of one column per modality
    (:data:`METRIC_GROUPS`, ``missing_50``, ``noisy_50``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--metrics {text!r} names no metric")
    for name in names:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ConfigError(
                f"--metrics: {name!r} is not a metric name (accuracy, macro_f1, "
                "balanced_accuracy, ece, robust_50, missing_50, noisy_50, probe, head, head_ece)"
            )
    return names


def expand_metrics(names: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metric keys of the columns ``names`` stand for, given what the runs recorded: a
    group (:data:`METRIC_GROUPS`, ``missing_50``, ``noisy_50``) becomes one key per modality;
    a name no run recorded stays (its cells read ``–``), so that a typo shows as an empty
    column rather than vanishing."""
    recorded = list(dict.fromkeys(str(r["metric"]) for r in records if r["split"] == "test"))
    out: list[str] = []
    for name in names:
        if name in recorded:
            keys = [name]
        elif name in METRIC_GROUPS:
            keys = [k for k in recorded if k.startswith(METRIC_GROUPS[name])] or [name]
        elif match := _RATE_GROUP.fullmatch(name):
            keys = [
                k
                for k in recorded
                if (found := _RATE_KEY.fullmatch(k))
                and found["kind"] == match["kind"]
                and found["pct"] == match["pct"]
            ] or [name]
        else:
            keys = [name]
        out += [k for k in keys if k not in out]
    return out


def fmt_stat(stat: Stat | None, digits: int = 4) -> str:
    """``mean ± half-width`` of the 95 % interval; the mean alone for one seed."""
    if stat is None:
        return "–"
    if stat.n < 2:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.half_width:.{digits}f}"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def headline_metrics(records: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The task's headline metrics: accuracy and macro-F1, or MAE, Pearson r and sign accuracy."""
    test = {r["metric"] for r in records if r["split"] == "test"}
    if "accuracy" not in test and "mae" in test:
        return REGRESSION
    return CLASSIFICATION


def bayes_accuracy(records: Sequence[Mapping[str, Any]]) -> float | None:
    values = [r["value"] for r in records if r["metric"] == "bayes_accuracy"]
    return float(values[0]) if values else None


def seed_counts(records: Sequence[Mapping[str, Any]], metric: str) -> dict[str, tuple[int, int]]:
    """``{method: (seeds with a test value of metric, seeds that did not finish)}``."""
    done: dict[str, set[int]] = {}
    failed: dict[str, set[int]] = {}
    for r in failed_runs(records):
        failed.setdefault(r["method"], set()).add(int(r["seed"]))
    for r in records:
        if r["split"] != "test":
            continue
        if r["metric"] == metric:
            done.setdefault(r["method"], set()).add(int(r["seed"]))
        elif r["metric"] == DIVERGED and r["value"]:
            failed.setdefault(r["method"], set()).add(int(r["seed"]))
    return {m: (len(done.get(m, ())), len(failed.get(m, ()))) for m in methods_of(records)}


def paired_cells(test: PairedTest | None, is_reference: bool) -> list[str]:
    """Δ (mean ± 95 % CI), Holm-adjusted p and the verdict of one method against the reference."""
    if is_reference:
        return ["(reference)", "–", "–"]
    if test is None:
        return ["–", "–", "–"]
    delta = f"{test.mean_diff:+.4f}"
    if test.n > 1:
        delta += f" ± {test.half_width:.4f}"
    verdict = "–" if math.isnan(test.p_holm) else ("yes" if test.significant else "no")
    return [delta, fmt_p(test.p_holm), verdict]


def comparison_table(
    records: Sequence[Mapping[str, Any]],
    reference: str = REFERENCE,
    epoch_seconds: Mapping[str, Stat] | None = None,
    compared: str | None = None,
) -> Table:
    """The headline table: per method, seeds, test metrics (mean ± 95 % CI), the paired
    difference to ``reference`` with its Holm-adjusted p-value and verdict, validation score,
    gap to the Bayes accuracy and, when given, the mean epoch time.

    ``compared`` is the metric compared with the reference (default: the task's first headline
    metric, accuracy or MAE); the other headline metrics follow it."""
    regression = headline_metrics(records) == REGRESSION
    keys = headline_metrics(records)
    if compared is not None:
        keys = (compared, *(k for k in keys if k != compared))
    main = keys[0]
    test = summarize(records, "test")
    val = summarize(records, "val")
    paired = paired_tests(records, main, reference)
    counts = seed_counts(records, main)
    bayes = bayes_accuracy(records)
    any_diverged = any(failed for _, failed in counts.values())
    title = f"Test metrics, mean ± {LEVEL * 100:.0f} % confidence interval over seeds"
    if bayes is not None:
        title += f" (Bayes accuracy {bayes:.4f})"

    columns = [Column("method", "left", essential=True), Column("seeds", essential=True)]
    if any_diverged:
        columns.append(Column("diverged", essential=True, help="runs whose loss became NaN"))
    main_short = metric_title(main, regression).removeprefix("test ")
    columns.append(Column(metric_title(main, regression), essential=True, short=main_short))
    if paired:
        columns += [
            Column(
                f"Δ {main_short} vs {reference}",
                essential=True,
                short=f"Δ vs {reference}",
                help="paired difference on shared seeds, mean ± 95 % CI",
            ),
            Column("p (Holm)", essential=True, help="paired t-test, Holm-adjusted over methods"),
            Column(
                "significant",
                essential=True,
                short="sig.",
                help=f"Holm-adjusted p < {ALPHA:g}",
            ),
        ]
    columns += [Column(metric_title(k, regression)) for k in keys[1:]]
    primary = headline_metrics(records)[0]
    val_title = f"validation {METRIC_TITLES[primary].removeprefix('test ')}"
    columns.append(Column(val_title, short="val"))
    if bayes is not None and not regression:
        columns.append(Column("gap to Bayes", help="Bayes accuracy minus mean test accuracy"))
    if epoch_seconds:
        columns.append(Column("epoch time", help="mean seconds per epoch (train + validation)"))

    rows = []
    for method in methods_of(records):
        stats = test.get(method, {})
        done, failed = counts[method]
        row = [method, str(done)]
        if any_diverged:
            row.append(f"{failed}/{done + failed}")
        row.append(fmt_stat(stats.get(main)))
        if paired:
            row += paired_cells(paired.get(method), method == reference)
        row += [fmt_stat(stats.get(k)) for k in keys[1:]]
        row.append(fmt_stat(val.get(method, {}).get(primary)))
        if bayes is not None and not regression:
            row.append("–" if primary not in stats else f"{bayes - stats[primary].mean:.4f}")
        if epoch_seconds:
            s = epoch_seconds.get(method)
            row.append("–" if s is None else f"{s.mean:.2f} s")
        rows.append(row)
    notes = []
    if paired:
        notes.append(
            f"Δ: {metric_title(main)} minus `{reference}`'s on the same seeds (paired), mean ± "
            f"{LEVEL * 100:.0f} % CI; p: two-sided paired t-test, Holm-adjusted over the "
            f"{sum(not math.isnan(p.p) for p in paired.values())} methods compared with "
            f"`{reference}`; significant when p (Holm) < {ALPHA:g}."
        )
    if any(s.n < 2 for stats in test.values() for s in stats.values()):
        notes.append("A single seed has no interval: its cells give the value alone.")
    notes += significance_notes(paired, reference, main)
    return Table(columns, rows, title, notes)


#: Metrics whose differences read as points (hundredths): the accuracy-like ones.
_NOT_IN_POINTS = ("mae", "pearson", "loss")
#: How many differences :func:`significance_notes` estimates seeds for.
SEED_ESTIMATES = 5


def _difference(value: float, metric: str) -> str:
    if metric in _NOT_IN_POINTS:
        return f"{value:+.4f}"
    return f"{100 * value:+.1f} points"


def significance_notes(
    paired: Mapping[str, PairedTest], reference: str, metric: str, alpha: float = ALPHA
) -> list[str]:
    """Plain words on what the seeds can decide: whether any difference from ``reference`` is
    significant, the ratio of mean to paired standard deviation a difference needs with these
    seeds and this many methods (:func:`~mmbalance.report.stats.required_ratio`), whether the
    design can reach it at all, and, for the largest differences that are not significant, about
    how many seeds would make each significant after the correction (80 % chance at the observed
    mean and spread, :func:`~mmbalance.report.stats.seeds_for_significance`)."""
    tested = {m: t for m, t in paired.items() if not math.isnan(t.p)}
    if not tested:
        if paired:
            return [
                f"One seed per method cannot show any difference from `{reference}` to be "
                "significant: a paired test needs at least 2 seeds (3 or more in practice)."
            ]
        return []
    family = len(tested)
    n = min(t.n for t in tested.values())
    needed = required_ratio(n, family, alpha)
    ratios = {
        m: abs(t.mean_diff) / t.std if t.std > 0 else math.inf
        for m, t in tested.items()
        if not t.significant and t.mean_diff != 0
    }
    notes = []
    if not any(t.significant for t in tested.values()):
        best = max(ratios, key=lambda m: ratios[m], default=None)
        text = (
            f"**No difference from `{reference}` is significant after Holm's correction over "
            f"{family} methods.** With {n} seeds, a difference must be at least {needed:.1f} "
            "times the standard deviation of its paired differences"
        )
        if best is not None:
            text += f" (the largest here: {ratios[best]:.1f}, `{best}`)"
            if ratios[best] < needed:
                text += "; with these seeds and methods, none of the observed differences can be"
        notes.append(text + ".")
    estimates = []
    for m in sorted(ratios, key=lambda m: -ratios[m])[:SEED_ESTIMATES]:
        t = tested[m]
        seeds = seeds_for_significance(t.mean_diff, t.std, family, alpha)
        when = f"about {seeds} seeds" if seeds is not None else f"more than {MAX_SEEDS} seeds"
        estimates.append(f"`{m}` vs `{reference}`: {_difference(t.mean_diff, metric)}, {when}")
    if estimates:
        notes.append(
            "Seeds that would make a difference significant after the correction (80 % chance, "
            f"if its mean and paired spread are as observed, {family} methods): "
            + "; ".join(estimates)
            + "."
        )
    return notes


def metrics_table(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Table:
    """The columns a user picks (``--metrics``, names of :func:`parse_metrics`, expanded by
    :func:`expand_metrics`): per method, each metric's mean ± 95 % CI over seeds (test split).
    The first four are essential; a terminal too narrow for the others names those left out."""
    regression = headline_metrics(records) == REGRESSION
    keys = expand_metrics(names, records)
    test = summarize(records, "test")
    columns = [Column("method", "left", essential=True)]
    columns += [Column(metric_title(k, regression), essential=i < 4) for i, k in enumerate(keys)]
    rows = [
        [method, *(fmt_stat(test.get(method, {}).get(k), 3) for k in keys)]
        for method in methods_of(records)
    ]
    notes = [
        "Mean ± 95 % CI over seeds (test split). Worst missing r %: the lowest accuracy over "
        "the modalities when one is absent from r % of the test samples; probe / head: each "
        "encoder's linear probe / unimodal head inside the trained model."
    ]
    missing = [k for k in keys if not any(k in stats for stats in test.values())]
    if missing:
        notes.append(f"No run recorded {', '.join(missing)}: its cells read –.")
    return Table(columns, rows, "Picked metrics", notes)


def _stat_rows(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str], per_modality: Sequence[str]
) -> list[list[str]]:
    """Per method, its name and each test metric of ``keys`` (mean ± 95 % CI, 3 digits);
    :data:`ABSENT` for a ``<prefix><modality>`` key (a prefix of ``per_modality``) of a modality
    the method does not use (:func:`~mmbalance.report.records.unused_modalities`)."""
    test = summarize(records, "test")
    unused = unused_modalities(records)

    def modality(key: str) -> str | None:
        prefix = next((p for p in per_modality if key.startswith(p)), None)
        return None if prefix is None else key.removeprefix(prefix)

    rows = []
    for method in methods_of(records):
        stats, skip = test.get(method, {}), unused.get(method, set())
        cells = [ABSENT if modality(k) in skip else fmt_stat(stats.get(k), 3) for k in keys]
        rows.append([method, *cells])
    return rows


def contribution_table(records: Sequence[Mapping[str, Any]]) -> Table | None:
    """Per method: linear-probe accuracy of each encoder, Shapley value of each modality and the
    imbalance degree (mean ± 95 % CI); ``—`` where the method does not use the modality."""
    regression = headline_metrics(records) == REGRESSION
    probes = modalities_of(records, "probe_accuracy_")
    shapley = modalities_of(records, "shapley_")
    if not probes and not shapley:
        return None
    test = summarize(records, "test")
    unused = unused_modalities(records)
    keys = [f"probe_accuracy_{m}" for m in probes] + [f"shapley_{m}" for m in shapley]
    has_degree = any("imbalance_degree" in s for s in test.values())
    keys += ["imbalance_degree"] if has_degree else []
    columns = [Column("method", "left", essential=True)]
    columns += [Column(metric_title(k, regression)) for k in keys]
    rows = _stat_rows(records, keys, ("probe_accuracy_", "shapley_"))
    notes = [
        "Probe: linear probe on each frozen encoder (test split). Shapley: each modality's share of "
        "the fused test accuracy, absent modalities permuted; imbalance degree = (max − min) / sum "
        "of the positive Shapley values. Mean ± 95 % CI over seeds."
    ]
    if any(unused.values()):
        notes.append(
            f"{ABSENT}: the method does not use this modality (its Shapley value is exactly 0 on "
            "every seed), so its encoder is untrained and is not probed."
        )
    return Table(columns, rows, "Modality contributions", notes)


def calibration_table(records: Sequence[Mapping[str, Any]]) -> Table | None:
    """Per method: balanced accuracy and the expected calibration error (15 bins) of the fused
    prediction and of each unimodal head (mean ± 95 % CI); ``None`` without these metrics."""
    test = summarize(records, "test")
    heads = modalities_of(records, "unimodal_ece_")
    keys = [k for k in ("balanced_accuracy", "ece") if any(k in s for s in test.values())]
    if "ece" not in keys:
        return None
    keys += [f"unimodal_ece_{m}" for m in heads]
    columns = [Column("method", "left", essential=True)]
    columns += [Column(metric_title(k), essential=k == "ece") for k in keys]
    rows = _stat_rows(records, keys, ("unimodal_ece_",))
    notes = [
        "Balanced accuracy: the mean recall over the classes. ECE: expected calibration error "
        "of the softmax confidence, 15 equal-width bins (lower is better), for the method's "
        "prediction and for each unimodal head where the model has them. Mean ± 95 % CI over "
        "seeds (test split)."
    ]
    return Table(columns, rows, "Calibration", notes)


def missing_rules(configs: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict[str, str]:
    """``{label: how its method predicts without a modality}``
    (:attr:`~mmbalance.methods.Method.missing_modality`), from each run's ``config.yaml``."""
    out: dict[str, str] = {}
    for (label, _), cfg in configs.items():
        name = str((cfg.get("method") or {}).get("name", ""))
        if name in METHODS:
            out.setdefault(label, METHODS.get(name).missing_modality)
    return out


def robustness_table(
    records: Sequence[Mapping[str, Any]], kind: str, rules: Mapping[str, str] | None = None
) -> Table | None:
    """Per method and modality, test accuracy when the modality is ``missing`` (with each
    method's rule for a missing modality, ``rules``: ``{label: rule}``) or ``noisy`` for 20, 50
    and 100 % of the test samples (mean ± 95 % CI); ``None`` when the runs have no such metric."""
    found = [
        (match["modality"], int(match["pct"]))
        for key in dict.fromkeys(str(r["metric"]) for r in records if r["split"] == "test")
        if (match := _RATE_KEY.fullmatch(key)) and match["kind"] == kind
    ]
    if not found:
        return None
    modalities = list(dict.fromkeys(m for m, _ in found))
    rates = sorted({pct for _, pct in found})
    test = summarize(records, "test")
    columns = [Column("method", "left", essential=True)]
    if rules:
        columns.append(Column(f"{kind} modality means", "left", wrap=True))
    columns += [
        Column(f"{m} {kind} {pct} %", essential=pct == 50) for m in modalities for pct in rates
    ]
    rows = []
    for method in methods_of(records):
        stats = test.get(method, {})
        row = [method] + ([rules.get(method, "–")] if rules else [])
        row += [fmt_stat(stats.get(f"{kind}_{m}_{pct}"), 3) for m in modalities for pct in rates]
        rows.append(row)
    what = (
        "absent, following each method's rule for a missing modality (stated per method)"
        if kind == "missing"
        else "replaced by Gaussian noise with its own mean and standard deviation"
    )
    notes = [
        f"Test accuracy when one modality is {what}, for the share of test samples given; the "
        "corrupted samples and their noise are the same for every method and seed. Mean ± 95 % "
        "CI over seeds; at 0 % every column would be the plain test accuracy."
    ]
    title = "Missing modality at test time" if kind == "missing" else "Noisy modality at test time"
    return Table(columns, rows, title, notes)


#: How ``errors.unimodal_predictors`` of ``analysis.json`` reads in a report.
PREDICTOR_NAMES = {"unimodal_heads": "unimodal heads", "linear_probes": "linear probes"}


def _condition_counts(analysis: Mapping[str, Any]) -> tuple[int, int]:
    """Samples with at least one unimodal predictor right, and with none right."""
    errors = analysis["errors"]
    none = int(errors["groups"].get("none", {}).get("count", 0))
    return int(errors["n"]) - none, none


def _counts_cell(counts: Sequence[int]) -> str:
    """Per-seed sample counts: all of them for up to five seeds, else the range."""
    if len(counts) <= 5:
        return " / ".join(str(c) for c in counts)
    return f"{min(counts)}–{max(counts)}"


def error_table(analyses: Mapping[str, list[dict[str, Any]]]) -> Table:
    """Per method: its unimodal predictors, fused accuracy, routing and synergy rates (mean ±
    95 % CI over seeds), each rate next to the number of test samples it rests on (per seed).
    The notes say plainly when methods used different unimodal predictors."""
    try:
        return _error_table(analyses)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"an analysis.json lacks its error analysis ({err!r})") from None


def _error_table(analyses: Mapping[str, list[dict[str, Any]]]) -> Table:
    kinds = {}
    for method, runs in analyses.items():
        names = sorted({str(a["errors"].get("unimodal_predictors", "?")) for a in runs})
        kinds[method] = " / ".join(PREDICTOR_NAMES.get(n, n) for n in names)
    columns = [
        Column("method", "left", essential=True),
        Column("unimodal predictors", "left"),
        Column("fused accuracy"),
        Column("routing rate", essential=True),
        Column(
            "samples: some right",
            short="n",
            help="test samples per seed with a right unimodal predictor",
        ),
        Column("synergy rate", essential=True),
        Column(
            "samples: all wrong",
            short="n",
            help="test samples per seed where every unimodal predictor is wrong",
        ),
    ]
    rows = []
    few = False
    for method, runs in analyses.items():
        counts = [_condition_counts(a) for a in runs]
        row = [
            method,
            kinds[method],
            fmt_stat(describe(a["errors"].get("fused_accuracy") for a in runs)),
        ]
        for i, key in enumerate(("routing_rate", "synergy_rate")):
            n = [c[i] for c in counts]
            cell = fmt_stat(describe(a["errors"].get(key) for a in runs))
            if n and min(n) < FEW_SAMPLES and cell != "–":
                cell += " †"
                few = True
            row += [cell, _counts_cell(n)]
        rows.append(row)
    notes = [
        "Routing rate: fused prediction right when at least one unimodal predictor is right; "
        "synergy rate: fused right when all are wrong. Mean ± 95 % CI over seeds; the sample "
        "columns give, per seed, how many test samples each rate rests on."
    ]
    if few:
        notes.append(
            f"†: rests on fewer than {FEW_SAMPLES} samples in some seed; read it as noisy."
        )
    if len(set(kinds.values())) > 1:
        used = "; ".join(f"{m}: {k}" for m, k in kinds.items())
        notes.append(
            "**Warning: the methods used different unimodal predictors** for the error analysis "
            f"({used}). Unimodal heads are trained with the model, linear probes are fitted "
            "afterwards on its frozen latents, so the groups and the routing and synergy rates "
            "of these methods are not directly comparable."
        )
    elif kinds:
        notes.append(
            f"Every method's error analysis used {next(iter(kinds.values()))} as unimodal "
            "predictors."
        )
    meanings = {str(a["errors"].get("right_means", "")) for r in analyses.values() for a in r}
    meanings.discard("")
    if meanings:
        notes.append(f"A prediction counts as right when the {' / '.join(sorted(meanings))}.")
    return Table(columns, rows, "Error analysis (test split)", notes)


def epoch_seconds(
    histories: Mapping[tuple[str, int], list[dict[str, float]]],
) -> dict[str, Stat]:
    """``{method: Stat}`` of the mean epoch time of each seed (the ``seconds`` of metrics.csv)."""
    per_run: dict[str, list[float]] = {}
    for (method, _), rows in histories.items():
        seconds = [r["seconds"] for r in rows if math.isfinite(r.get("seconds", math.nan))]
        if seconds:
            per_run.setdefault(method, []).append(sum(seconds) / len(seconds))
    return {m: s for m, v in per_run.items() if (s := describe(v)) is not None}


def _option_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_option_value(v) for v in value) + "]"
    return str(value)


def method_defaults(name: str) -> dict[str, Any]:
    """The options of a registered method with their defaults (``{}`` for a name this version
    does not know): a run directory written before every default was recorded still shows
    every option."""
    if name not in METHODS:
        return {}
    params = METHODS.get(name).Params
    if not dataclasses.is_dataclass(params):
        return {}
    out = {}
    for f in dataclasses.fields(params):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def method_options(cfg: Mapping[str, Any]) -> str:
    """``k=v, ...`` of the ``method`` section of a run's config over the method's defaults;
    options that differ from the default are bold."""
    section = dict(cfg.get("method") or {})
    name = str(section.pop("name", ""))
    defaults = method_defaults(name)
    merged = {**defaults, **section}
    parts = []
    for key, value in merged.items():
        text = f"{key}={_option_value(value)}"
        parts.append(f"**{text}**" if key in defaults and value != defaults[key] else text)
    return ", ".join(parts) or "(no options)"


def options_table(
    configs: Mapping[tuple[str, int], Mapping[str, Any]],
    histories: Mapping[tuple[str, int], list[dict[str, float]]],
) -> Table | None:
    """Per method: the method's options as run (``config.yaml`` over the registered defaults),
    the epochs run and the epoch time (mean ± 95 % CI over seeds)."""
    if not configs:
        return None
    options: dict[str, set[str]] = {}
    for (method, _), cfg in configs.items():
        options.setdefault(method, set()).add(method_options(cfg))
    epochs: dict[str, list[int]] = {}
    for (method, _), rows in histories.items():
        epochs.setdefault(method, []).append(len(rows))
    seconds = epoch_seconds(histories)
    columns = [
        Column("method", "left", essential=True),
        Column("method options", "left", wrap=True),
        Column("epochs run"),
        Column("epoch time (s)", help="mean seconds per epoch, mean ± 95 % CI over seeds"),
    ]
    rows = []
    for method, texts in options.items():
        e = epochs.get(method, [])
        span = "–" if not e else (str(e[0]) if min(e) == max(e) else f"{min(e)}–{max(e)}")
        rows.append([method, " | ".join(sorted(texts)), span, fmt_stat(seconds.get(method), 2)])
    notes = [
        "Options as each run resolved them (`config.yaml`, over the method's defaults; **bold**: "
        "not the default). The epoch time includes the validation pass and the per-epoch "
        "analysis, and varies with whatever else the machine ran."
    ]
    return Table(columns, rows, "Methods: options and cost", notes)


def shared_config(
    configs: Mapping[tuple[str, int], Mapping[str, Any]],
) -> tuple[dict[str, Any], list[str]]:
    """The configuration all runs share apart from ``method`` and ``train.seed`` (that of the
    first run), and the dotted keys where some runs differ from it."""
    if not configs:
        return {}, []

    def flat(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            if isinstance(v, Mapping):
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
        return out

    first = next(iter(configs.values()))
    base = {k: v for k, v in first.items() if k != "method"}
    if isinstance(base.get("train"), Mapping):
        base["train"] = {k: v for k, v in base["train"].items() if k != "seed"}
    reference = flat(base)
    differ = set()
    for cfg in configs.values():
        other = flat({k: v for k, v in cfg.items() if k != "method"})
        other.pop("train.seed", None)
        differ |= {k for k in reference.keys() | other.keys() if reference.get(k) != other.get(k)}
    return base, sorted(differ)


def data_table(records: Mapping[tuple[str, int], Mapping[str, Any]]) -> Table | None:
    """The classes of the data the runs trained on (from the runs' ``data.json``): each class's
    index, name and samples per split; None without class names."""
    if not records:
        return None
    first = next(iter(records.values()))
    names = first.get("class_names")
    if not isinstance(names, list) or not names:
        return None
    counts = (first.get("split") or {}).get("class_counts") or {}
    splits = [s for s in ("train", "val", "test") if isinstance(counts.get(s), list)]
    columns = [Column("class", essential=True), Column("name", "left", essential=True)]
    columns += [Column(f"{s} samples") for s in splits]
    rows = [
        [str(i), str(name), *(str(counts[s][i]) for s in splits)] for i, name in enumerate(names)
    ]
    return Table(columns, rows, title="Classes")
