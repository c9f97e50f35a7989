"""Reports of runs and comparisons: tidy records, statistics, tables, figures and the page.

Layout (each module imports only the ones above it, and nothing above ``eval`` in the library):

* :mod:`~mmbalance.report.records`: tidy records from a run's summary, reading run files
  (damaged files raise :class:`~mmbalance.errors.DataError`);
* :mod:`~mmbalance.report.stats`: summaries over seeds (95 % t intervals) and paired t-tests
  with Holm correction;
* :mod:`~mmbalance.report.tables`: the one table writer (Markdown, HTML, text that fits 80
  columns);
* :mod:`~mmbalance.report.result_tables`: the tables of a comparison built from records;
* :mod:`~mmbalance.report.plots`: the figures;
* :mod:`~mmbalance.report.page`: ``report.md`` and a self-contained ``report.html``.

The names below are the public API, used by the CLI, ``compare`` and the benchmarks.
"""

from mmbalance.report.page import write_report
from mmbalance.report.plots import plot_comparison, plot_modality_curves, plot_shapley
from mmbalance.report.records import (
    DIVERGED,
    STATUS_METRIC,
    STATUS_SPLIT,
    ResultSet,
    failed_runs,
    load_result_set,
    run_records,
    status_record,
    unused_modalities,
)
from mmbalance.report.result_tables import (
    REFERENCE,
    calibration_table,
    comparison_table,
    contribution_table,
    epoch_seconds,
    error_table,
    expand_metrics,
    fmt_p,
    fmt_stat,
    metric_title,
    metrics_table,
    options_table,
    parse_metrics,
    robustness_table,
)
from mmbalance.report.stats import PairedTest, Stat, describe, holm, paired_tests, summarize
from mmbalance.report.tables import Column, Table, terminal_width, to_html, to_markdown, to_text

__all__ = [
    "DIVERGED",
    "REFERENCE",
    "STATUS_METRIC",
    "STATUS_SPLIT",
    "Column",
    "PairedTest",
    "ResultSet",
    "Stat",
    "Table",
    "calibration_table",
    "comparison_table",
    "contribution_table",
    "describe",
    "epoch_seconds",
    "error_table",
    "expand_metrics",
    "failed_runs",
    "fmt_p",
    "fmt_stat",
    "holm",
    "load_result_set",
    "metric_title",
    "metrics_table",
    "options_table",
    "paired_tests",
    "parse_metrics",
    "plot_comparison",
    "plot_modality_curves",
    "plot_shapley",
    "robustness_table",
    "run_records",
    "status_record",
    "summarize",
    "terminal_width",
    "to_html",
    "to_markdown",
    "to_text",
    "unused_modalities",
    "write_report",
]
