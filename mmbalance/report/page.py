"""``report.md`` and a self-contained ``report.html`` for a compare directory or one run.

The page, top to bottom: the comparison table (test metrics with 95 % intervals, the paired
t-test of every method against ``joint`` with Holm-adjusted p-values, epoch time) and its
figure; each method's options and cost; the modality contributions; calibration (balanced
accuracy, ECE of the prediction and of each unimodal head) and robustness to a missing or noisy
modality at test time, with each method's rule for a missing modality; the error analysis with
the sample counts behind every rate; the validation curves and the per-modality curves; the
configuration the runs share. The HTML embeds the figures as base64 PNGs, so it can be mailed
or archived as one file; the Markdown links the PNG files written next to it. Both are written
atomically (a temporary file renamed over the old one).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from mmbalance.errors import DataError
from mmbalance.io import output_lock, output_owner, write_text_atomic
from mmbalance.report.plots import (
    plot_comparison,
    plot_curves,
    plot_errors,
    plot_method_scalars,
    plot_modality_curves,
    plot_shapley,
)
from mmbalance.report.records import ResultSet, load_result_set, methods_of, unused_modalities
from mmbalance.report.result_tables import (
    REFERENCE,
    bayes_accuracy,
    calibration_table,
    comparison_table,
    contribution_table,
    data_table,
    epoch_seconds,
    error_table,
    expand_metrics,
    metrics_table,
    missing_rules,
    options_table,
    robustness_table,
    shared_config,
)
from mmbalance.report.tables import (
    HTML_STYLE,
    Table,
    inline_html,
    md_code,
    md_inline,
    md_text,
    to_html,
    to_markdown,
)

#: The file name of the report's comparison figure, in the report's directory.
COMPARISON_FIGURE = "report_comparison.png"

#: Styles of the page (the tables' own come from :data:`~mmbalance.report.tables.HTML_STYLE`).
PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em 1.5em;max-width:1220px;"
    "color:#111;line-height:1.4}"
    "h1{font-size:1.6em;margin:0.3em 0}h2{font-size:1.25em;margin:1.2em 0 0.4em;"
    "border-bottom:1px solid #ddd}"
    "p{margin:0.35em 0}img{max-width:100%;height:auto;display:block;margin:0.5em 0}"
    "pre{background:#f6f6f6;padding:0.8em;overflow:auto;font-size:12px}"
    "code{background:#f2f2f2;padding:0 0.2em;border-radius:2px}"
)


@dataclass
class Section:
    """A titled part of the report: notes, tables and figures, in that order."""

    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, Table]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    code: str = ""
    #: what the figures show, printed between the tables and the figures
    plot_notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.tables or self.plots or self.code or self.notes)


def build_sections(
    results: ResultSet, reference: str = REFERENCE, metrics: Sequence[str] | None = None
) -> list[Section]:
    """Every section of the report of ``results`` (figures are written into its root);
    ``metrics`` (``--metrics``) adds the table of the picked metrics, the first of which the
    comparison table compares with the reference."""
    root, records = results.root, results.records
    order = methods_of(records)
    histories = results.histories()
    configs = results.configs()
    analyses = results.analyses()
    unused = unused_modalities(records)
    partial = [m for m in order if unused.get(m)]
    seconds = epoch_seconds(histories)

    comparison = Section("Comparison")
    compared = expand_metrics(metrics, records)[0] if metrics else None
    table = comparison_table(records, reference, seconds, compared)
    comparison.tables.append(("comparison", table))
    if metrics:
        comparison.tables.append(("metrics", metrics_table(records, metrics)))
    figure = plot_comparison(records, root / COMPARISON_FIGURE, reference)
    comparison.plots += [figure] if figure is not None else []
    figure_note = (
        f"The figure shows each method's test score minus `{reference}`'s on the same seeds (the "
        f"line at 0 is `{reference}`), with its 95 % CI; a filled point is significant after "
        "Holm correction, the label gives its p-value. Below: each encoder's linear-probe "
        f"accuracy against `{reference}`'s (line and band)."
    )
    if partial:
        figure_note += (
            " Methods that use only some modalities (a Shapley value of exactly 0 on every "
            "seed: " + ", ".join(f"`{m}`" for m in partial) + ") sit on their own panel, "
            f"against `{reference}`'s score, so that they do not stretch the others' axis."
        )
    comparison.plot_notes.append(figure_note)
    sections = [comparison]

    options = options_table(configs, histories)
    if options is not None:
        sections.append(Section("Methods: options and cost", tables=[("options", options)]))

    contributions = Section("Modality contributions")
    table = contribution_table(records)
    if table is not None:
        contributions.tables.append(("contributions", table))
    shapley = plot_shapley(records, root / "report_shapley.png")
    if shapley is not None:
        contributions.plots.append(shapley)
    sections.append(contributions)

    beyond = Section("Calibration and robustness")
    rules = missing_rules(configs)
    for ident, extra in (
        ("calibration", calibration_table(records)),
        ("missing", robustness_table(records, "missing", rules)),
        ("noisy", robustness_table(records, "noisy")),
    ):
        if extra is not None:
            beyond.tables.append((ident, extra))
    sections.append(beyond)

    # a method that ignores a modality has an untrained head or encoder for it: its groups of
    # "right unimodal predictors" would rest on that untrained predictor
    scored = {m: analyses[m] for m in order if m in analyses and not unused.get(m)}
    if scored:
        errors = Section(
            "Error analysis",
            tables=[("errors", error_table(scored))],
            plots=[p for p in [plot_errors(scored, root / "report_errors.png", order)] if p],
        )
        left_out = [m for m in analyses if m not in scored]
        if left_out:
            errors.notes.append(
                "Left out: " + ", ".join(f"`{m}`" for m in left_out) + " (they do not use every "
                "modality, so their predictor for an unused modality is untrained)."
            )
        sections.append(errors)
    curves = plot_curves(histories, root / "report_curves.png", order, partial)
    if curves is not None:
        sections.append(Section("Validation score per epoch", plots=[curves]))
    modality = plot_modality_curves(histories, root / "report_modality_curves.png", unused, order)
    if modality is not None:
        note = (
            "After every epoch, on the validation split (`train.epoch_curves`): accuracy of "
            "each modality's unimodal head (models with heads), of a ridge probe fitted on a "
            "fixed half of the validation latents and scored on the other half (every model), "
            "and each modality's Shapley value for the fused validation accuracy (absent "
            "modalities permuted). Regression: binary accuracy of the sign."
        )
        if partial:
            note += " Modalities a method does not use (untrained heads and encoders) are left out."
        sections.append(Section("Per-modality curves over epochs", [note], plots=[modality]))
    scalars = plot_method_scalars(results.step_logs(), root / "report_method_scalars.png", order)
    if scalars is not None:
        note = (
            "What each method computes at every step and logs (`steps.csv`, TensorBoard "
            "`step/<name>`): modulation coefficients, drop rates, divergences, loss weights, "
            "conflict decisions. Each line is a method's mean over an epoch's steps, averaged "
            "over seeds with its 95 % band."
        )
        sections.append(Section("Method scalars over training", [note], plots=[scalars]))
    data = data_section(results.data_records())
    if data is not None:
        sections.append(data)
    shared, differ = shared_config(configs)
    if shared:
        notes = [
            "The configuration of the first run without its `method` section (see the "
            "options above) and without `train.seed`."
        ]
        if differ:
            notes.append(
                "**These keys differ between runs:** " + ", ".join(f"`{k}`" for k in differ) + "."
            )
        else:
            notes.append("Every run shares it.")
        sections.append(
            Section(
                "Shared configuration",
                notes,
                code=yaml.safe_dump(shared, sort_keys=False).rstrip(),
            )
        )
    return [s for s in sections if not s.empty]


def data_section(records: dict[tuple[str, int], dict]) -> Section | None:
    """What the runs trained on (their ``data.json``): the dataset, how it was split, its
    content fingerprint, whether every run saw the same split, and its classes by name."""
    if not records:
        return None
    first = next(iter(records.values()))
    notes = [f"Dataset `{first.get('dataset', '?')}`: {first.get('notes') or 'no notes'}."]
    sizes = first.get("sizes")
    if isinstance(sizes, dict):
        notes.append(", ".join(f"{k} {v}" for k, v in sizes.items()) + " samples.")
    if first.get("fingerprint"):
        notes.append(f"Content SHA-256: `{first['fingerprint']}`.")
    hashes = {
        str((r.get("split") or {}).get("sha256"))
        for r in records.values()
        if isinstance(r.get("split"), dict)
    }
    if len(hashes) == 1:
        notes.append(f"Every run trained on the same split (indices' SHA-256 `{hashes.pop()}`).")
    elif len(hashes) > 1:
        notes.append(f"**The runs trained on {len(hashes)} different splits.**")
    section = Section("Data", notes)
    table = data_table(records)
    if table is not None:
        section.tables.append(("classes", table))
    return section


def _untitled(table: Table, heading: str) -> Table:
    """The table without its title when the section heading already says it."""
    return dataclasses.replace(table, title="") if table.title == heading else table


def render_markdown(results: ResultSet, sections: list[Section], intro: list[str]) -> str:
    """The Markdown page. Everything that may hold a user's string (method labels, option
    values, names and keys read from the run files, the directory) is escaped
    (:func:`~mmbalance.report.tables.md_inline`) or fenced, so none of it becomes markup."""
    md = ["# mmbalance report", "", f"Source: {md_code(str(results.root))}", ""]
    md += [md_inline(n) + "\n" for n in intro]
    for sec in sections:
        md += [f"## {md_text(sec.title)}", ""]
        md += [md_inline(n) + "\n" for n in sec.notes]
        for _, table in sec.tables:
            md += [to_markdown(table), ""]
        if sec.plots:
            md += [md_inline(n) + "\n" for n in sec.plot_notes]
        md += [f"![{md_text(sec.title)}]({quote(p.name)})\n" for p in sec.plots]
        if sec.code:
            # a fence longer than any run of backticks in the code, which it cannot then close
            runs = [len(r) for r in re.findall(r"`+", sec.code)]
            fence = "`" * max(3, max(runs, default=0) + 1)
            md += [f"{fence}yaml", sec.code, fence, ""]
    return "\n".join(md).rstrip() + "\n"


def render_html(results: ResultSet, sections: list[Section], intro: list[str]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>mmbalance report</title><style>{PAGE_STYLE}{HTML_STYLE}</style></head><body>",
        "<h1>mmbalance report</h1>",
        f"<p>Source: <code>{e(str(results.root))}</code></p>",
    ]
    parts += [f"<p>{inline_html(n)}</p>" for n in intro]
    for sec in sections:
        parts.append(f"<h2>{e(sec.title)}</h2>")
        parts += [f"<p>{inline_html(n)}</p>" for n in sec.notes]
        for ident, table in sec.tables:
            parts.append(to_html(_untitled(table, sec.title), ident))
        if sec.plots:
            parts += [f"<p>{inline_html(n)}</p>" for n in sec.plot_notes]
        for plot in sec.plots:
            data = base64.b64encode(plot.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{e(sec.title)}' src=\"data:image/png;base64,{data}\">")
        if sec.code:
            parts.append(f"<pre>{e(sec.code)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


#: The files a report writes into its directory.
REPORT_FILES = (
    "report.md",
    "report.html",
    "report_comparison.png",
    "report_shapley.png",
    "report_errors.png",
    "report_curves.png",
    "report_modality_curves.png",
    "report_method_scalars.png",
)


def write_report(
    results: ResultSet | str | Path,
    reference: str = REFERENCE,
    metrics: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the ``report_*.png`` figures into the root of
    ``results`` (a :class:`~mmbalance.report.records.ResultSet` in memory, or a compare or run
    directory, read with :func:`~mmbalance.report.records.load_result_set`); returns the two
    pages. ``metrics`` (names of :func:`~mmbalance.report.result_tables.parse_metrics`) adds the
    table of the picked metrics and makes the first of them the one compared with
    ``reference``.

    A directory mmbalance marked as its output (:func:`mmbalance.io.claim_output`) is written
    under its lock; into one without the mark (written by hand, or by an older version) the
    report only adds files, and is refused if one of its files is already there."""
    if not isinstance(results, ResultSet):
        results = load_result_set(results)
    root = results.root
    lock: Any = contextlib.nullcontext()
    if output_owner(root) is None:
        existing = [name for name in REPORT_FILES if os.path.lexists(root / name)]
        if existing:
            raise DataError(
                f"{str(root)!r} is not marked as an output of mmbalance and already holds "
                f"{existing[0]}, which the report would overwrite; move it away first"
            )
    else:
        lock = output_lock(root, "report directory")
    with lock:
        return _write_report(results, reference, metrics)


def _write_report(
    results: ResultSet, reference: str, metrics: Sequence[str] | None
) -> tuple[Path, Path]:
    sections = build_sections(results, reference, metrics)
    seeds = len({r["seed"] for r in results.records})
    intro = [
        f"{len(methods_of(results.records))} method(s), {seeds} seed(s). Every ± is a 95 % "
        "confidence interval of the mean over seeds (Student's t); differences between methods "
        "are paired t-tests on shared seeds, Holm-corrected over the methods compared."
    ]
    bayes = bayes_accuracy(results.records)
    if bayes is not None:
        intro.append(f"Bayes accuracy of the dataset: **{bayes:.4f}**.")
    md_path, html_path = results.root / "report.md", results.root / "report.html"
    write_text_atomic(md_path, render_markdown(results, sections, intro))
    write_text_atomic(html_path, render_html(results, sections, intro))
    return md_path, html_path
