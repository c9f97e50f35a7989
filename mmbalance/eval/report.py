"""``report.md`` and a self-contained ``report.html`` for a compare directory or one run.

The report holds the comparison table (mean ± std over seeds, and a paired comparison of each
method's test accuracy against ``joint`` on the seeds both share), the Bayes accuracy where the
dataset knows it, and plots: the method comparison, the Shapley contribution of each modality
per method, the error-analysis groups (with a table of which unimodal predictors, heads or
probes, each method's error analysis used, and a plain warning when they differ), the per-epoch
validation accuracy and the per-epoch, per-modality curves of :mod:`mmbalance.eval.curves`
(head accuracy, probe accuracy and Shapley value, mean ± std over seeds per method). The HTML
embeds the plots as base64 PNGs, so it can be mailed or archived as one file; the Markdown links
the PNG files written next to it.

Paired comparison: for the seeds ``s`` run by both a method and ``joint``,
``d_s = acc_method(s) - acc_joint(s)``; the report gives ``mean(d)``, ``std(d)`` and marks the
difference as significant when ``|mean(d)| > 2 * std(d) / sqrt(n)`` (needs ``n >= 2``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.errors import MMBalanceError
from mmbalance.eval.curves import QUANTITIES

REFERENCE = "joint"


@dataclass
class Source:
    """What a report is made of: tidy records and the run directory of each (method, seed)."""

    root: Path
    records: list[dict[str, Any]]
    runs: dict[tuple[str, int], Path]


def load_source(path: str | Path) -> Source:
    """Read a compare directory (``results.json``) or a single run directory (``metrics.json``)."""
    from mmbalance.compare import _records

    root = Path(path)
    if (root / "results.json").is_file():
        records = json.loads((root / "results.json").read_text())
        runs = {}
        for r in records:
            run_dir = root / r["method"] / f"seed{r['seed']}"
            if run_dir.is_dir():
                runs[(r["method"], int(r["seed"]))] = run_dir
        return Source(root, records, runs)
    if (root / "metrics.json").is_file():
        summary = json.loads((root / "metrics.json").read_text())
        label, seed = "run", 0
        if (root / "config.yaml").is_file():
            import yaml

            cfg = yaml.safe_load((root / "config.yaml").read_text()) or {}
            label = str((cfg.get("method") or {}).get("name", label))
            seed = int((cfg.get("train") or {}).get("seed", seed))
        return Source(root, _records(label, seed, summary), {(label, seed): root})
    raise MMBalanceError(
        f"{str(root)!r} is neither a compare directory (results.json) nor a run (metrics.json)"
    )


# --- statistics ----------------------------------------------------------------------------------
def paired_against(
    records: Sequence[Mapping[str, Any]], metric: str = "accuracy", reference: str = REFERENCE
) -> dict[str, dict[str, float | int | bool]]:
    """``{method: {mean_diff, std_diff, n, significant}}`` of ``metric`` minus ``reference``'s
    on the same seeds (test split); methods without a shared seed are left out."""
    by: dict[str, dict[int, float]] = {}
    for r in records:
        if r["split"] == "test" and r["metric"] == metric:
            by.setdefault(r["method"], {})[int(r["seed"])] = float(r["value"])
    if reference not in by:
        return {}
    out: dict[str, dict[str, float | int | bool]] = {}
    for method, values in by.items():
        if method == reference:
            continue
        diffs = [values[s] - by[reference][s] for s in sorted(values) if s in by[reference]]
        if not diffs:
            continue
        mean = statistics.fmean(diffs)
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        significant = len(diffs) > 1 and abs(mean) > 2 * std / math.sqrt(len(diffs))
        out[method] = {
            "mean_diff": mean,
            "std_diff": std,
            "n": len(diffs),
            "significant": significant,
        }
    return out


def _table(source: Source) -> tuple[list[str], list[list[str]]]:
    from mmbalance.compare import summarize

    summary = summarize(source.records, "test")
    paired = paired_against(source.records)
    keys = ["accuracy", "macro_f1"]
    if not any("accuracy" in s for s in summary.values()):
        keys = ["mae", "pearson", "binary_accuracy"]
    extra = sorted({k for s in summary.values() for k in s if k.startswith("probe_accuracy_")})
    extra += sorted({k for s in summary.values() for k in s if k.startswith("shapley_")})
    extra += [
        k
        for k in ("imbalance_degree", "routing_rate", "synergy_rate")
        if any(k in s for s in summary.values())
    ]
    header = ["method", "seeds", *keys, *extra]
    if paired:
        header += [f"Δ accuracy vs {REFERENCE} (paired)", "significant"]
    rows = []
    for method, stats in summary.items():
        n = max(s[2] for s in stats.values())
        row = [method, str(n)]
        for k in keys + extra:
            s = stats.get(k)
            row.append("-" if s is None else f"{s[0]:.4f} ± {s[1]:.4f}")
        if paired:
            p = paired.get(method)
            if p is None:
                row += ["-", "-"]
            else:
                row += [
                    f"{p['mean_diff']:+.4f} ± {p['std_diff']:.4f} (n={p['n']})",
                    "yes" if p["significant"] else "no",
                ]
        rows.append(row)
    return header, rows


#: How ``errors.unimodal_predictors`` of ``analysis.json`` reads in a report.
PREDICTOR_NAMES = {"unimodal_heads": "unimodal heads", "linear_probes": "linear probes"}


def _predictor_kinds(analyses: Mapping[str, list[dict[str, Any]]]) -> dict[str, str]:
    """``{method: kind}`` of the unimodal predictors its error analysis used (all seeds)."""
    kinds = {}
    for method, runs in analyses.items():
        names = sorted({str(a["errors"].get("unimodal_predictors", "?")) for a in runs})
        kinds[method] = " / ".join(PREDICTOR_NAMES.get(n, n) for n in names)
    return kinds


def _error_table(
    analyses: Mapping[str, list[dict[str, Any]]],
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows (method, predictors, rates) and notes of the error-analysis section; the notes
    say plainly when methods used different unimodal predictors."""
    kinds = _predictor_kinds(analyses)
    header = ["method", "unimodal predictors", "fused accuracy", "routing rate", "synergy rate"]
    rows = []
    for method, runs in analyses.items():
        row = [method, kinds[method]]
        for key in ("fused_accuracy", "routing_rate", "synergy_rate"):
            mean, std = _mean_std([a["errors"].get(key) for a in runs])
            row.append("-" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        rows.append(row)
    notes = []
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
    return header, rows, notes


def _bayes(source: Source) -> float | None:
    values = [r["value"] for r in source.records if r["metric"] == "bayes_accuracy"]
    return float(values[0]) if values else None


# --- plots ---------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _analyses(source: Source) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for (method, _), run_dir in sorted(source.runs.items()):
        f = run_dir / "analysis.json"
        if f.is_file():
            out.setdefault(method, []).append(json.loads(f.read_text()))
    return out


def _grouped_bars(ax: Any, methods: list[str], cats: list[str], values: Any, errs: Any) -> None:
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, values[i], width, yerr=errs[i], capsize=2, label=method)
    ax.set_xticks(range(len(cats)), cats)
    ax.grid(axis="y", alpha=0.3)


def _mean_std(v: list[float]) -> tuple[float, float]:
    v = [x for x in v if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), 0.0
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def plot_shapley(analyses: Mapping[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Grouped bars: Shapley value of each modality per method (mean ± std over seeds)."""
    methods = list(analyses)
    if not methods:
        return None
    mods = list(analyses[methods[0]][0]["contribution"]["shapley"])
    stats = [
        [_mean_std([a["contribution"]["shapley"].get(m) for a in analyses[k]]) for m in mods]
        for k in methods
    ]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(mods) * len(methods) ** 0.5 + 3), 3.6))
    _grouped_bars(
        ax, methods, mods, [[s[0] for s in r] for r in stats], [[s[1] for s in r] for r in stats]
    )
    ax.set_ylabel("Shapley value (test accuracy)")
    ax.set_title("modality contribution per method")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_errors(analyses: Mapping[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Per group of correct unimodal predictors: share of samples and fused accuracy."""
    methods = list(analyses)
    if not methods:
        return None
    groups = list(analyses[methods[0]][0]["errors"]["groups"])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.4 * len(groups) + 6), 3.8))
    for ax, key, label in (
        (axes[0], "fraction", "share of test samples"),
        (axes[1], "fused_accuracy", "fused accuracy in group"),
    ):
        stats = [
            [_mean_std([a["errors"]["groups"][g][key] for a in analyses[k]]) for g in groups]
            for k in methods
        ]
        _grouped_bars(
            ax,
            methods,
            groups,
            [[s[0] for s in r] for r in stats],
            [[s[1] for s in r] for r in stats],
        )
        ax.set_ylabel(label)
        ax.set_xlabel("unimodal predictors that are right")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("error analysis (test split)")
    return _save(fig, path)


def _history(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as floats (NaN where a row lacks a column)."""
    f = run_dir / "metrics.csv"
    if not f.is_file():
        return []
    with f.open() as fh:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
            for r in csv.DictReader(fh)
        ]


def plot_curves(source: Source, path: Path) -> Path | None:
    """Validation accuracy (binary accuracy for regression) per epoch of every run (one colour
    per method)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colours: dict[str, Any] = {}
    drawn = False
    metric = "val_accuracy"
    for (method, _), run_dir in sorted(source.runs.items()):
        rows = _history(run_dir)
        metric = next(
            (k for k in ("val_accuracy", "val_binary_accuracy") if rows and k in rows[0]), ""
        )
        if not metric:
            continue
        xs = [int(r["epoch"]) + 1 for r in rows]
        ys = [r[metric] for r in rows]
        if method not in colours:
            colours[method] = f"C{len(colours) % 10}"
            ax.plot(xs, ys, color=colours[method], alpha=0.8, label=method)
        else:
            ax.plot(xs, ys, color=colours[method], alpha=0.8)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " ").replace("val ", "validation "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("validation score per epoch (one line per seed)")
    return _save(fig, path)


def modality_curves(source: Source) -> dict[str, dict[str, list[list[float]]]]:
    """``{column: {method: [per-seed series]}}`` of the per-modality curve columns
    (``val_<quantity>_<modality>``) found in the runs' ``metrics.csv``."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    prefixes = tuple(f"val_{q}_" for q in QUANTITIES)
    for (method, _), run_dir in sorted(source.runs.items()):
        rows = _history(run_dir)
        columns = [k for k in (rows[0] if rows else {}) if k.startswith(prefixes)]
        for col in columns:
            out.setdefault(col, {}).setdefault(method, []).append([r[col] for r in rows])
    return out


def _curve_column(column: str) -> tuple[str, str]:
    """``val_<quantity>_<modality>`` -> ``(quantity, modality)`` (modality names may hold ``_``)."""
    q = next(q for q in QUANTITIES if column.startswith(f"val_{q}_"))
    return q, column[len(f"val_{q}_") :]


def _mean_over_seeds(series: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and std per epoch over the seeds that reached that epoch (runs may stop early)."""
    length = max(len(s) for s in series)
    stats = [_mean_std([s[i] for s in series if i < len(s)]) for i in range(length)]
    return [m for m, _ in stats], [d for _, d in stats]


def plot_modality_curves(source: Source, path: Path) -> Path | None:
    """Per-epoch head accuracy, probe accuracy and Shapley value of each modality: one row of
    panels per quantity, one column per modality, one line per method (mean ± std over seeds)."""
    curves = modality_curves(source)
    if not curves:
        return None
    parsed = [_curve_column(c) for c in curves]
    quantities = [q for q in QUANTITIES if any(qc == q for qc, _ in parsed)]
    modalities = sorted({mod for _, mod in parsed})
    methods = sorted({m for by in curves.values() for m in by})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    plt = _plt()
    fig, axes = plt.subplots(
        len(quantities),
        len(modalities),
        figsize=(3.4 * len(modalities) + 1.0, 2.6 * len(quantities) + 0.6),
        sharex=True,
        sharey="row",
        squeeze=False,
    )
    for i, q in enumerate(quantities):
        for j, mod in enumerate(modalities):
            ax = axes[i][j]
            for method, series in curves.get(f"val_{q}_{mod}", {}).items():
                mean, std = _mean_over_seeds(series)
                xs = list(range(1, len(mean) + 1))
                ax.plot(xs, mean, color=colours[method])
                lo = [m - d for m, d in zip(mean, std, strict=True)]
                hi = [m + d for m, d in zip(mean, std, strict=True)]
                ax.fill_between(xs, lo, hi, color=colours[method], alpha=0.15, linewidth=0)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(mod)
            if j == 0:
                ax.set_ylabel(QUANTITIES[q], fontsize=8)
            if i == len(quantities) - 1:
                ax.set_xlabel("epoch")
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    axes[0][0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    handles = [Line2D([], [], color=c, label=m) for m, c in colours.items()]
    # beside the panels, not over them (saved with a tight bounding box that includes it)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle("per-modality validation curves (mean ± std over seeds)")
    return _save(fig, path)


# --- writers -------------------------------------------------------------------------------------
@dataclass
class Section:
    """A titled part of the report: notes, an optional table and an optional plot."""

    title: str
    notes: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    plot: Path | None = None


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    parts = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(parts) + "</table>"


def _html_note(note: str) -> str:
    """A note's Markdown ``**bold**`` as ``<strong>``, everything else escaped."""
    pieces = html.escape(note).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces))


def _sections(source: Source) -> list[Section]:
    from mmbalance.compare import plot_comparison

    root = source.root
    analyses = _analyses(source)
    sections = [
        Section(
            "Method comparison",
            plot=plot_comparison(source.records, root / "report_comparison.png"),
        ),
        Section(
            "Shapley contribution of each modality",
            plot=plot_shapley(analyses, root / "report_shapley.png"),
        ),
    ]
    if analyses:
        header, rows, notes = _error_table(analyses)
        sections.append(
            Section(
                "Error analysis",
                notes,
                (header, rows),
                plot_errors(analyses, root / "report_errors.png"),
            )
        )
    sections.append(
        Section("Validation score per epoch", plot=plot_curves(source, root / "report_curves.png"))
    )
    sections.append(
        Section(
            "Per-modality curves over epochs",
            [
                "After every epoch, on the validation split (`train.epoch_analysis`): accuracy of "
                "each modality's unimodal head (models with heads), of a ridge probe fitted on a "
                "fixed half of the validation latents and scored on the other half (every model), "
                "and each modality's Shapley value for the fused validation accuracy (absent "
                "modalities permuted). Regression: binary accuracy of the sign."
            ],
            plot=plot_modality_curves(source, root / "report_modality_curves.png"),
        )
    )
    return [s for s in sections if s.plot is not None or s.table is not None]


def write_report(path: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the ``report_*.png`` plots into ``path``."""
    source = load_source(path)
    root = source.root
    header, rows = _table(source)
    bayes = _bayes(source)
    sections = _sections(source)
    config = ""
    for run_dir in source.runs.values():
        if (run_dir / "config.yaml").is_file():
            config = (run_dir / "config.yaml").read_text()
            break
    notes = [
        "Test metrics, mean ± std over seeds. Shapley values: each modality's share of the fused "
        "test accuracy (for regression: of the binary accuracy of the sign; absent modalities "
        "permuted within the test set); imbalance degree = (max − min) / sum of the positive "
        "Shapley values. Routing rate: fused right when at least one unimodal predictor is right; "
        "synergy rate: fused right when all are wrong.",
        f"Paired comparison against `{REFERENCE}` on shared seeds: significant when "
        "|mean diff| > 2·std of diffs / √n.",
    ]
    if bayes is not None:
        notes.append(f"Bayes accuracy of the dataset: **{bayes:.4f}**.")

    md = ["# mmbalance report", "", f"Source: `{root}`", ""]
    md += [n + "\n" for n in notes]
    md += _md_table(header, rows)
    for sec in sections:
        md += ["", f"## {sec.title}", ""]
        md += [n + "\n" for n in sec.notes]
        if sec.table is not None:
            md += [*_md_table(*sec.table), ""]
        if sec.plot is not None:
            md += [f"![{sec.title}]({sec.plot.name})"]
    if config:
        md += ["", "## Resolved configuration (one run)", "", "```yaml", config.rstrip(), "```"]
    md_path = root / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmbalance report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;font-size:13px;display:block;overflow-x:auto}"
        "td,th{border:1px solid #bbb;padding:3px 6px;"
        "text-align:right}td:first-child{text-align:left}th{background:#eee}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
        "<h1>mmbalance report</h1>",
        f"<p>Source: <code>{e(str(root))}</code></p>",
    ]
    parts += [f"<p>{_html_note(n)}</p>" for n in notes]
    parts.append(_html_table(header, rows))
    for sec in sections:
        parts.append(f"<h2>{e(sec.title)}</h2>")
        parts += [f"<p>{_html_note(n)}</p>" for n in sec.notes]
        if sec.table is not None:
            parts.append(_html_table(*sec.table))
        if sec.plot is not None:
            data = base64.b64encode(sec.plot.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{e(sec.title)}' src=\"data:image/png;base64,{data}\">")
    if config:
        parts.append(f"<h2>Resolved configuration (one run)</h2><pre>{e(config)}</pre>")
    parts.append("</body></html>")
    html_path = root / "report.html"
    html_path.write_text("\n".join(parts))
    return md_path, html_path
