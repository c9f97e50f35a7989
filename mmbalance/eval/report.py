"""``report.md`` and a self-contained ``report.html`` for a compare directory or one run.

The report holds the comparison table (mean ± std over seeds, and a paired comparison of each
method's test accuracy against ``joint`` on the seeds both share), the Bayes accuracy where the
dataset knows it, and plots: the method comparison, the Shapley contribution of each modality
per method, the error-analysis groups and the per-epoch validation accuracy. The HTML embeds the
plots as base64 PNGs, so it can be mailed or archived as one file; the Markdown links the PNG
files written next to it.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.errors import MMBalanceError

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
    fig.savefig(path, dpi=110)
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


def plot_curves(source: Source, path: Path) -> Path | None:
    """Validation accuracy per epoch of every run (one colour per method)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colours: dict[str, Any] = {}
    drawn = False
    for (method, _), run_dir in sorted(source.runs.items()):
        f = run_dir / "metrics.csv"
        if not f.is_file():
            continue
        with f.open() as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "val_accuracy" not in rows[0]:
            continue
        xs = [int(r["epoch"]) + 1 for r in rows]
        ys = [float(r["val_accuracy"]) for r in rows]
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
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("validation accuracy per epoch (one line per seed)")
    return _save(fig, path)


# --- writers -------------------------------------------------------------------------------------
def write_report(path: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the ``report_*.png`` plots into ``path``."""
    from mmbalance.compare import plot_comparison

    source = load_source(path)
    root = source.root
    header, rows = _table(source)
    bayes = _bayes(source)
    analyses = _analyses(source)
    plots: list[tuple[str, Path]] = [
        ("Method comparison", plot_comparison(source.records, root / "report_comparison.png"))
    ]
    for title, made in (
        (
            "Shapley contribution of each modality",
            plot_shapley(analyses, root / "report_shapley.png"),
        ),
        ("Error analysis", plot_errors(analyses, root / "report_errors.png")),
        ("Validation accuracy per epoch", plot_curves(source, root / "report_curves.png")),
    ):
        if made is not None:
            plots.append((title, made))
    config = ""
    for run_dir in source.runs.values():
        if (run_dir / "config.yaml").is_file():
            config = (run_dir / "config.yaml").read_text()
            break
    notes = [
        "Test metrics, mean ± std over seeds. Shapley values: each modality's share of the fused "
        "test accuracy (absent modalities permuted within the test set); imbalance degree = "
        "(max − min) / sum of the positive Shapley values. Routing rate: fused right when at least "
        "one unimodal predictor is right; synergy rate: fused right when all are wrong.",
        f"Paired comparison against `{REFERENCE}` on shared seeds: significant when "
        "|mean diff| > 2·std of diffs / √n.",
    ]
    if bayes is not None:
        notes.append(f"Bayes accuracy of the dataset: **{bayes:.4f}**.")

    md = ["# mmbalance report", "", f"Source: `{root}`", ""]
    md += [n + "\n" for n in notes]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    for title, p in plots:
        md += ["", f"## {title}", "", f"![{title}]({p.name})"]
    if config:
        md += ["", "## Resolved configuration (one run)", "", "```yaml", config.rstrip(), "```"]
    md_path = root / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmbalance report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;font-size:13px;display:block;overflow-x:auto}td,th{border:1px solid #bbb;padding:3px 6px;"
        "text-align:right}td:first-child{text-align:left}th{background:#eee}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
        "<h1>mmbalance report</h1>",
        f"<p>Source: <code>{e(str(root))}</code></p>",
    ]
    parts += [f"<p>{e(n).replace('**', '')}</p>" for n in notes]
    parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table>")
    for title, p in plots:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(
            f"<h2>{e(title)}</h2><img alt='{e(title)}' src=\"data:image/png;base64,{data}\">"
        )
    if config:
        parts.append(f"<h2>Resolved configuration (one run)</h2><pre>{e(config)}</pre>")
    parts.append("</body></html>")
    html_path = root / "report.html"
    html_path.write_text("\n".join(parts))
    return md_path, html_path
