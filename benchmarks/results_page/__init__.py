"""The results page, ``docs/results.md``: what every method costs and what it buys.

* :mod:`~benchmarks.results_page.studies`: the studies (dataset settings), the method order and
  each method's search space;
* :mod:`~benchmarks.results_page.runner`: each study run through the comparison engine
  (:func:`mmbalance.compare.run_comparison`: the validation search, then the seeded runs, on a
  process pool, resumable), saved as tidy records in ``benchmarks/results/accuracy.json``;
* :mod:`~benchmarks.results_page.page`: the page and its figures, written with the public
  :mod:`mmbalance.report` API (tables, statistics, comparison figure).

``benchmarks/run_results.py`` is the command that runs them.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
