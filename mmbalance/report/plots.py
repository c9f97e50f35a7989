"""The report's figures. Every error bar and band is a 95 % t interval over seeds.

* :func:`plot_comparison`: the multimodal methods as paired differences to the reference
  (``joint``, the line at 0); the methods that use only some modalities (``unimodal``
  baselines: a modality with a Shapley value of exactly 0 on every seed) on their own panel,
  against the reference's line, so that they do not stretch the axis of the others; one panel
  per encoder's linear-probe accuracy.
* :func:`plot_shapley`, :func:`plot_errors`: modality contributions and the error-analysis groups
  (with the number of samples each group's fused accuracy rests on).
* :func:`plot_curves`, :func:`plot_modality_curves`: per-epoch validation curves, one line per
  method (mean over seeds) with its 95 % band; curves of a modality a method does not use (an
  untrained head or encoder, a Shapley value of 0) are left out.

matplotlib is imported inside the functions (Agg backend), so importing the report costs no
plotting library.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmbalance.io import write_bytes_atomic
from mmbalance.report.records import methods_of, modalities_of, unused_modalities
from mmbalance.report.result_tables import (
    REFERENCE,
    REGRESSION,
    bayes_accuracy,
    fmt_p,
    headline_metrics,
    metric_title,
)
from mmbalance.report.stats import Stat, describe, paired_tests, summarize
from mmbalance.report.tables import wrap_text

#: Colour of the comparison figure's points (the method names are on its axis).
MARKER = "#1f4e79"
#: Width of the figures in inches (at :data:`DPI`, about the width of a report page).
WIDTH = 11.0
DPI = 110


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Render ``fig`` as PNG in memory, then write it atomically (matplotlib's ``savefig`` to a
    path would follow a link planted there)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def literal_text(plot: Callable[..., Path | None]) -> Callable[..., Path | None]:
    """Draw every text of ``plot``'s figure literally: method labels, modality and scalar names
    come from users and from files, and a ``$`` in one would otherwise start matplotlib's
    mathtext (``$x^$`` fails to parse and loses the whole figure)."""

    @functools.wraps(plot)
    def drawn(*args: Any, **kwargs: Any) -> Path | None:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return drawn


def method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure of a report (tab10, then tab20)."""
    methods = list(dict.fromkeys(methods))
    plt = _plt()
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def tick_label(name: str, width: int = 26) -> str:
    """A method label on an axis, wrapped after ``[``, ``,`` or ``=`` when it is long."""
    return "\n".join(wrap_text(name, width))


def _half(stat: Stat | None) -> float:
    return 0.0 if stat is None or math.isnan(stat.half_width) else stat.half_width


def comparison_panels(
    records: Sequence[Mapping[str, Any]], reference: str = REFERENCE
) -> list[tuple[str, list[str]]]:
    """The panels of :func:`plot_comparison`, each ``(kind, methods)``: ``delta`` (paired
    differences to the reference; ``absolute`` when there is no reference to pair with),
    ``partial`` (methods that use only some modalities) and ``probe:<modality>``."""
    main = headline_metrics(records)[0]
    test = summarize(records, "test")
    methods = [m for m in methods_of(records) if main in test.get(m, {})]
    unused = unused_modalities(records)
    partial = [m for m in methods if unused.get(m)]
    full = [m for m in methods if m not in partial]
    paired = paired_tests(records, main, reference)
    panels: list[tuple[str, list[str]]] = []
    if reference in full and paired and len(full) > 1:
        panels.append(("delta", [m for m in full if m != reference]))
    elif full:
        panels.append(("absolute", full))
    if partial:
        panels.append(("partial", partial))
    for modality in modalities_of(records, "probe_accuracy_"):
        users = [m for m in methods if modality not in unused.get(m, set())]
        if any(f"probe_accuracy_{modality}" in test.get(m, {}) for m in users):
            panels.append((f"probe:{modality}", users))
    return panels


@literal_text
def plot_comparison(
    records: Sequence[Mapping[str, Any]], path: Path, reference: str = REFERENCE
) -> Path | None:
    """The comparison figure (see the module docstring); returns ``path``, or None when no run
    has a test score (every run diverged)."""
    keys = headline_metrics(records)
    main = keys[0]
    regression = keys == REGRESSION
    title = metric_title(main, regression)
    test = summarize(records, "test")
    paired = paired_tests(records, main, reference)
    ref = test.get(reference, {}).get(main)
    bayes = bayes_accuracy(records) if main == "accuracy" else None
    panels = comparison_panels(records, reference)
    if not panels:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    tallest = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(
        rows, cols, figsize=(WIDTH, rows * (0.34 * tallest + 1.4)), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)

    def dots(ax: Any, names: list[str], stats: list[Stat | None], filled: list[bool]) -> None:
        ys = list(range(len(names)))[::-1]
        for y, stat, fill in zip(ys, stats, filled, strict=True):
            if stat is None:
                continue
            ax.errorbar(
                stat.mean,
                y,
                xerr=_half(stat),
                fmt="o",
                capsize=3,
                color=MARKER,
                markerfacecolor=MARKER if fill else "white",
            )
        ax.set_yticks(ys, [tick_label(n) for n in names])
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.grid(axis="x", alpha=0.3)

    def reference_line(ax: Any, stat: Stat | None, label: str) -> None:
        if stat is None:
            return
        ax.axvline(stat.mean, color="0.25", linewidth=1.2, label=label)
        if stat.n > 1:
            ax.axvspan(stat.low, stat.high, color="0.5", alpha=0.12, linewidth=0)

    for ax, (kind, names) in zip(axes.flat, panels, strict=False):
        if kind == "delta":
            stats: list[Stat | None] = [
                Stat(paired[m].mean_diff, 0.0, paired[m].n, paired[m].half_width)
                if m in paired
                else None
                for m in names
            ]
            dots(ax, names, stats, [m in paired and paired[m].significant for m in names])
            ax.axvline(0.0, color="0.25", linewidth=1.2)
            for y, m in zip(list(range(len(names)))[::-1], names, strict=True):
                if m in paired and not math.isnan(paired[m].p_holm):
                    ax.annotate(
                        "p " + fmt_p(paired[m].p_holm),
                        (1.0, y),
                        xycoords=("axes fraction", "data"),
                        xytext=(4, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=7,
                        color="0.3",
                    )
            ax.set_xlabel(f"{title} minus {reference}'s (paired, same seeds)")
            ax.set_title(
                f"multimodal methods vs {reference} ({ref.mean:.4f}: the line at 0)\n"
                "filled: significant after Holm correction",
                fontsize=9,
            )
        elif kind == "absolute":
            dots(ax, names, [test[m].get(main) for m in names], [True] * len(names))
            ax.set_xlabel(title)
            ax.set_title("methods", fontsize=10)
        elif kind == "partial":
            dots(ax, names, [test[m].get(main) for m in names], [True] * len(names))
            reference_line(ax, ref, f"{reference} {ref.mean:.4f}" if ref else "")
            if bayes is not None:
                ax.axvline(bayes, color="#c44e52", linestyle="--", label=f"Bayes {bayes:.4f}")
            ax.set_xlabel(title)
            ax.set_title("methods that use only some modalities", fontsize=10)
            if ref is not None or bayes is not None:
                ax.legend(loc="best", fontsize=7)
        else:
            modality = kind.split(":", 1)[1]
            key = f"probe_accuracy_{modality}"
            dots(ax, names, [test[m].get(key) for m in names], [True] * len(names))
            ref_probe = test.get(reference, {}).get(key)
            reference_line(ax, ref_probe, f"{reference} {ref_probe.mean:.3f}" if ref_probe else "")
            what = "sign accuracy" if regression else "accuracy"
            ax.set_xlabel(f"linear-probe {what} of the {modality} encoder")
            ax.set_title(f"encoder {modality}", fontsize=10)
            if ref_probe is not None:
                ax.legend(loc="best", fontsize=7)
    fig.suptitle("Method comparison (test split, mean ± 95 % CI over seeds)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _grouped_bars(
    ax: Any,
    methods: list[str],
    cats: list[str],
    stats: list[list[Stat | None]],
    colours: Mapping[str, Any],
) -> list[tuple[float, str, int]]:
    """Bars per category and method with 95 % CI whiskers; returns (x, method, category index)
    of every bar drawn."""
    width = 0.8 / max(len(methods), 1)
    drawn = []
    for i, method in enumerate(methods):
        for j in range(len(cats)):
            stat = stats[i][j]
            if stat is None:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            ax.bar(
                x,
                stat.mean,
                width,
                yerr=_half(stat),
                capsize=2,
                color=colours[method],
                label=method if j == min(k for k in range(len(cats)) if stats[i][k]) else None,
            )
            drawn.append((x, method, j))
    ax.set_xticks(range(len(cats)), cats)
    ax.grid(axis="y", alpha=0.3)
    return drawn


@literal_text
def plot_shapley(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Grouped bars: test Shapley value of each modality per method (mean ± 95 % CI); a
    modality the method does not use has no bar."""
    modalities = modalities_of(records, "shapley_")
    if not modalities:
        return None
    test = summarize(records, "test")
    unused = unused_modalities(records)
    methods = [
        m for m in methods_of(records) if any(k.startswith("shapley_") for k in test.get(m, {}))
    ]
    stats = [
        [
            None if mod in unused.get(m, set()) else test[m].get(f"shapley_{mod}")
            for mod in modalities
        ]
        for m in methods
    ]
    plt = _plt()
    fig, ax = plt.subplots(
        figsize=(min(WIDTH, 3.0 + 1.1 * len(modalities) * len(methods) ** 0.6), 3.8)
    )
    _grouped_bars(ax, methods, modalities, stats, method_colours(methods_of(records)))
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_ylabel("Shapley value (test accuracy)")
    ax.set_title("Modality contribution per method (mean ± 95 % CI over seeds)", fontsize=10)
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


@literal_text
def plot_errors(
    analyses: Mapping[str, list[dict[str, Any]]], path: Path, order: Sequence[str] = ()
) -> Path | None:
    """Per group of right unimodal predictors: share of test samples and fused accuracy in the
    group (mean ± 95 % CI), each fused-accuracy bar labelled with its samples per seed."""
    methods = [m for m in order if m in analyses] + [m for m in analyses if m not in order]
    if not methods:
        return None
    groups = list(analyses[methods[0]][0]["errors"]["groups"])
    colours = method_colours([*order, *(m for m in methods if m not in order)])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 4.2))
    for ax, key, label in (
        (axes[0], "fraction", "share of test samples"),
        (axes[1], "fused_accuracy", "fused accuracy in the group"),
    ):
        stats = [
            [
                describe(a["errors"]["groups"].get(g, {}).get(key) for a in analyses[m])
                for g in groups
            ]
            for m in methods
        ]
        drawn = _grouped_bars(ax, methods, groups, stats, colours)
        ax.set_ylabel(label)
        ax.set_xlabel("unimodal predictors that are right")
        if key == "fused_accuracy":
            for x, m, j in drawn:
                groups_of = [a["errors"]["groups"].get(groups[j], {}) for a in analyses[m]]
                counts = [g.get("count", 0) for g in groups_of]
                stat = describe(g.get("fused_accuracy") for g in groups_of)
                top = 0.0 if stat is None else stat.mean + _half(stat)
                ax.annotate(
                    f"{sum(counts) / len(counts):.0f}",
                    (x, min(top, 1.0)),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                    color="0.2",
                )
            ax.set_ylim(0.0, 1.2)
            ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(
        "Error analysis (test split; bar labels: samples in the group per seed)", fontsize=11
    )
    fig.tight_layout()
    return _save(fig, path)


def _band(series: list[list[float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs, mean, low and high of the 95 % band over the seeds that reached each epoch."""
    length = max(len(s) for s in series)
    xs, mean, low, high = [], [], [], []
    for i in range(length):
        stat = describe(s[i] for s in series if i < len(s))
        if stat is None:
            continue
        xs.append(i + 1)
        mean.append(stat.mean)
        low.append(stat.mean - _half(stat))
        high.append(stat.mean + _half(stat))
    return xs, mean, low, high


@literal_text
def plot_curves(
    histories: Mapping[tuple[str, int], list[dict[str, float]]],
    path: Path,
    order: Sequence[str] = (),
    dashed: Sequence[str] = (),
) -> Path | None:
    """Validation score per epoch (accuracy, or the sign accuracy for regression): one line per
    method, the mean over seeds, with its 95 % band; ``dashed`` methods (baselines that use only
    some modalities) are dashed."""
    columns = ("val_accuracy", "val_binary_accuracy")
    metric = next((c for c in columns for rows in histories.values() if rows and c in rows[0]), "")
    if not metric:
        return None
    by_method: dict[str, list[list[float]]] = {}
    for (method, _), rows in histories.items():
        by_method.setdefault(method, []).append([r.get(metric, math.nan) for r in rows])
    methods = [m for m in order if m in by_method] + [m for m in by_method if m not in order]
    colours = method_colours([*order, *(m for m in methods if m not in order)])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    for method in methods:
        xs, mean, low, high = _band(by_method[method])
        style = "--" if method in dashed else "-"
        ax.plot(xs, mean, style, color=colours[method], label=method, linewidth=1.5)
        ax.fill_between(xs, low, high, color=colours[method], alpha=0.15, linewidth=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation " + ("sign accuracy" if "binary" in metric else "accuracy"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title("Validation score per epoch (mean ± 95 % CI over seeds)", fontsize=10)
    return _save(fig, path)


#: At most this many method scalars get a panel (the most widely logged first).
MAX_SCALAR_PANELS = 12


@literal_text
def plot_method_scalars(
    step_logs: Mapping[tuple[str, int], list[dict[str, Any]]],
    path: Path,
    order: Sequence[str] = (),
) -> Path | None:
    """The per-step scalars the methods log (``steps.csv``: coefficients, drop rates,
    divergences, weights...) over training: one panel per scalar, one line per method, each the
    epoch's mean over its steps, averaged over seeds with a 95 % band."""
    # {name: {method: [per-seed list of per-epoch means]}}
    series: dict[str, dict[str, list[list[float]]]] = {}
    for (method, _), rows in step_logs.items():
        sums: dict[str, dict[int, list[float]]] = {}
        for r in rows:
            sums.setdefault(r["name"], {}).setdefault(r["epoch"], []).append(r["value"])
        for name, by_epoch in sums.items():
            last = max(by_epoch)
            means = [
                sum(by_epoch[e]) / len(by_epoch[e]) if e in by_epoch else math.nan
                for e in range(last + 1)
            ]
            series.setdefault(name, {}).setdefault(method, []).append(means)
    if not series:
        return None
    names = sorted(series, key=lambda n: (-len(series[n]), n))[:MAX_SCALAR_PANELS]
    methods = list(dict.fromkeys([*order, *(m for n in names for m in series[n])]))
    colours = method_colours(methods)
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    plt = _plt()
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    from matplotlib.ticker import MaxNLocator

    for ax, name in zip(axes.flat, names, strict=False):
        for method in [m for m in methods if m in series[name]]:
            xs, mean, low, high = _band(series[name][method])
            ax.plot(xs, mean, color=colours[method], label=method, linewidth=1.4)
            ax.fill_between(xs, low, high, color=colours[method], alpha=0.15, linewidth=0)
        ax.set_title(wrap_text(name, 40), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Method scalars per epoch (mean over the epoch's steps; mean ± 95 % CI over seeds)",
        fontsize=10,
    )
    return _save(fig, path)


def _curve_column(column: str) -> tuple[str, str] | None:
    """``val_<quantity>_<modality>`` -> ``(quantity, modality)`` (modality names may hold ``_``)."""
    from mmbalance.eval.curves import QUANTITIES  # here: it imports torch

    for q in QUANTITIES:
        if column.startswith(f"val_{q}_"):
            return q, column[len(f"val_{q}_") :]
    return None


def modality_curves(
    histories: Mapping[tuple[str, int], list[dict[str, float]]],
    unused: Mapping[str, set[str]] | None = None,
) -> dict[tuple[str, str], dict[str, list[list[float]]]]:
    """``{(quantity, modality): {method: [per-seed series]}}`` of the per-modality curve columns
    of ``metrics.csv``, without the modalities a method does not use."""
    unused = unused or {}
    out: dict[tuple[str, str], dict[str, list[list[float]]]] = {}
    for (method, _), rows in histories.items():
        for column in rows[0] if rows else {}:
            parsed = _curve_column(column)
            if parsed is None or parsed[1] in unused.get(method, set()):
                continue
            out.setdefault(parsed, {}).setdefault(method, []).append([r[column] for r in rows])
    return out


@literal_text
def plot_modality_curves(
    histories: Mapping[tuple[str, int], list[dict[str, float]]],
    path: Path,
    unused: Mapping[str, set[str]] | None = None,
    order: Sequence[str] = (),
) -> Path | None:
    """Per-epoch head accuracy, probe accuracy and Shapley value of each modality: one row of
    panels per quantity, one column per modality, one line per method (mean ± 95 % band)."""
    from mmbalance.eval.curves import QUANTITIES  # here: it imports torch

    curves = modality_curves(histories, unused)
    if not curves:
        return None
    quantities = [q for q in QUANTITIES if any(q == qc for qc, _ in curves)]
    modalities = list(dict.fromkeys(m for _, m in sorted(curves, key=lambda k: k[1])))
    found = {m for by in curves.values() for m in by}
    methods = [m for m in order if m in found] + sorted(found - set(order))
    colours = {m: c for m, c in method_colours([*order, *methods]).items() if m in found}
    plt = _plt()
    fig, axes = plt.subplots(
        len(quantities),
        len(modalities),
        figsize=(min(WIDTH - 1.6, 3.4 * len(modalities) + 1.0), 2.5 * len(quantities) + 0.6),
        sharex=True,
        sharey="row",
        squeeze=False,
    )
    for i, q in enumerate(quantities):
        for j, modality in enumerate(modalities):
            ax = axes[i][j]
            for method in methods:
                series = curves.get((q, modality), {}).get(method)
                if not series:
                    continue
                xs, mean, low, high = _band(series)
                ax.plot(xs, mean, color=colours[method], linewidth=1.3)
                ax.fill_between(xs, low, high, color=colours[method], alpha=0.15, linewidth=0)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(modality)
            if j == 0:
                ax.set_ylabel(QUANTITIES[q], fontsize=8)
            if i == len(quantities) - 1:
                ax.set_xlabel("epoch")
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    axes[0][0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    handles = [Line2D([], [], color=c, label=m) for m, c in colours.items()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle("Per-modality validation curves (mean ± 95 % CI over seeds)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
