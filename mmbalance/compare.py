"""Compare methods over seeds: train every (method, seed) run, then tabulate and plot.

``compare`` is resumable: a finished run (its ``metrics.json`` exists) is reused and an
interrupted one resumes from its last checkpoint, so re-running the same command after a kill
finishes the comparison without redoing work.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.build import build_dataset, resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.train.loop import RunResult, fit


@dataclass(frozen=True)
class Entry:
    """One compared configuration: a label, a method name and its options."""

    label: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()


def expand_methods(names: Sequence[str], modalities: Sequence[str]) -> list[Entry]:
    """Turn method names into compared entries, using each method's :meth:`Method.variants`
    (``unimodal`` becomes one entry per modality, so the table shows every modality alone)."""
    entries: list[Entry] = []
    for name in names:
        cls = METHODS.get(name)  # unknown names fail here, before anything trains
        for label, params in cls.variants(name, modalities):
            entries.append(Entry(label, name, tuple(sorted(params.items()))))
    return entries


def run_compare(
    methods: Sequence[str],
    seeds: int,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Train every method on ``seeds`` seeds and write ``out_dir/results.json``.

    Returns the tidy records ``{"method", "seed", "split", "metric", "value"}``.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out_dir = Path(out_dir)
    base = resolve_config(overrides)
    data = build_dataset(base)
    entries = expand_methods(methods, list(data.modalities))
    # validate every configuration before the first run starts
    configs = {
        e: resolve_config(
            {**overrides, "method": e.method, **{f"method.{k}": v for k, v in e.params}}
        )
        for e in entries
    }
    records: list[dict[str, Any]] = []
    for entry in entries:
        for seed in range(seeds):
            cfg = configs[entry]
            cfg.train.seed = seed
            run_dir = out_dir / entry.label / f"seed{seed}"
            result = run_or_reuse(cfg, run_dir)
            records += _records(entry.label, seed, result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(records, indent=1))
    return records


def run_or_reuse(cfg: Any, run_dir: Path) -> RunResult | dict[str, Any]:
    """The saved ``metrics.json`` of a finished run, or train it (resuming what exists)."""
    done = run_dir / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    # A run directory that exists belongs to this comparison: resume whatever stage it reached
    # (a kill during unimodal pre-training leaves checkpoints only under ``pretrain/``).
    return fit(cfg, run_dir, resume=run_dir.exists())


def _records(label: str, seed: int, result: RunResult | dict[str, Any]) -> list[dict[str, Any]]:
    summary = result.to_json() if isinstance(result, RunResult) else result
    rows = [
        {"method": label, "seed": seed, "split": split, "metric": metric, "value": value}
        for split, metrics in summary["metrics"].items()
        for metric, value in metrics.items()
    ]
    if summary.get("bayes_accuracy") is not None:
        rows.append(
            {
                "method": label,
                "seed": seed,
                "split": "test",
                "metric": "bayes_accuracy",
                "value": summary["bayes_accuracy"],
            }
        )
    return rows


def summarize(
    records: Sequence[Mapping[str, Any]], split: str = "test"
) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{method: {metric: (mean, std, n)}}`` over seeds for one split."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r["split"] == split:
            values.setdefault(r["method"], {}).setdefault(r["metric"], []).append(r["value"])
    return {
        method: {
            metric: (
                statistics.fmean(v),
                statistics.stdev(v) if len(v) > 1 else 0.0,
                len(v),
            )
            for metric, v in metrics.items()
        }
        for method, metrics in values.items()
    }


def results_table(records: Sequence[Mapping[str, Any]]) -> Any:
    """A rich table: mean ± std over seeds of the test metrics, per method."""
    from rich.markup import escape
    from rich.table import Table

    summary = summarize(records, "test")
    val = summarize(records, "val")
    metrics = ["accuracy", "macro_f1"]
    if any("mae" in m for m in summary.values()):
        metrics = ["mae", "pearson", "binary_accuracy"]
    probes = sorted({k for m in summary.values() for k in m if k.startswith("probe_accuracy_")})
    bayes = next((m["bayes_accuracy"][0] for m in summary.values() if "bayes_accuracy" in m), None)
    title = "test metrics, mean ± std over seeds"
    if bayes is not None:
        title += f" (Bayes accuracy {bayes:.4f})"
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    table.add_column("seeds", justify="right")
    table.add_column(f"val {metrics[0]}", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    if bayes is not None:
        table.add_column("gap to Bayes", justify="right")
    # regression probes are scored on the sign of the target (binary accuracy), and say so
    probe_label = "probe sign acc " if metrics[0] == "mae" else "probe "
    for p in probes:
        table.add_column(p.replace("probe_accuracy_", probe_label), justify="right")

    def fmt(stat: tuple[float, float, int] | None) -> str:
        return "-" if stat is None else f"{stat[0]:.4f}±{stat[1]:.4f}"

    for method, stats in summary.items():
        row = [escape(method), str(stats[metrics[0]][2]), fmt(val.get(method, {}).get(metrics[0]))]
        row += [fmt(stats.get(m)) for m in metrics]
        if bayes is not None:
            row.append(f"{bayes - stats['accuracy'][0]:.4f}")
        row += [fmt(stats.get(p)) for p in probes]
        table.add_row(*row)
    return table


def plot_comparison(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Two panels: the test metric per method and, when present, each encoder's probe accuracy.

    Dots with error bars (mean ± std over seeds) on a shared method axis, so that differences of
    a point or two between fused methods stay visible next to weak unimodal baselines; the Bayes
    accuracy, when known, is a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(records, "test")
    metric = "accuracy" if any("accuracy" in s for s in summary.values()) else "mae"
    methods = [m for m in summary if metric in summary[m]]
    probes = sorted({k for m in summary.values() for k in m if k.startswith("probe_accuracy_")})
    panels = 2 if probes else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(5.2 * panels, 0.45 * len(methods) + 1.6), sharey=True, squeeze=False
    )
    positions = list(range(len(methods)))[::-1]

    def dots(ax: Any, key: str, offset: float = 0.0, label: str | None = None) -> None:
        stats = [summary[m].get(key) for m in methods]
        xs = [s[0] if s else float("nan") for s in stats]
        errs = [s[1] if s else 0.0 for s in stats]
        ys = [p + offset for p in positions]
        ax.errorbar(xs, ys, xerr=errs, fmt="o", capsize=3, label=label)

    ax = axes[0][0]
    dots(ax, metric)
    bayes = next((s["bayes_accuracy"][0] for s in summary.values() if "bayes_accuracy" in s), None)
    if bayes is not None:
        ax.axvline(bayes, color="#c44e52", linestyle="--", label=f"Bayes {bayes:.3f}")
        ax.legend(loc="best", fontsize=8)
    ax.set_yticks(positions, methods)
    ax.set_xlabel(f"test {metric}")
    ax.grid(axis="x", alpha=0.3)
    if probes:
        ax = axes[0][1]
        step = 0.5 / max(len(probes), 1)
        for i, key in enumerate(probes):
            offset = (i - (len(probes) - 1) / 2) * step
            dots(ax, key, offset, key.replace("probe_accuracy_", ""))
        what = "sign accuracy" if metric == "mae" else "accuracy"
        ax.set_xlabel(f"linear-probe {what} of each encoder")
        ax.legend(loc="best", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("method comparison (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
