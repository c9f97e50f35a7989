"""Comparisons of methods over seeds, with an equal-budget validation search: one engine for
``mmbalance compare``, the accuracy benchmark and any program that compares methods.

* :mod:`~mmbalance.compare.methods`: what is compared (method names, variants, named sets, their
  resolved configurations);
* :mod:`~mmbalance.compare.search`: the search's candidates and the one rule that chooses;
* :mod:`~mmbalance.compare.execute`: how runs are executed (executors), trained, resumed or
  reused, and summed up (:class:`RunSummary`);
* :mod:`~mmbalance.compare.executors`: the executors that fan runs out to local processes, Ray
  or Slurm, and the registry ``--executor`` names them by (:func:`make_executor`);
* :mod:`~mmbalance.compare.engine`: :func:`run_comparison`, the entry point, which plans,
  searches, executes, records and reports.

Example::

    from mmbalance.compare import run_comparison

    done = run_comparison(["joint", "ogm_ge", "mcr"], {"dataset": "av-digits"}, "runs/cmp")
    print([(r.label, r.seed, r.metrics["test"]["accuracy"]) for r in done.runs if r.finished])
"""

from __future__ import annotations

from mmbalance.compare.engine import Comparison, run_comparison
from mmbalance.compare.execute import (
    CollectOnly,
    Executor,
    PlannedRun,
    RunSummary,
    Sequential,
    run_or_reuse,
)
from mmbalance.compare.executors import (
    EXECUTORS,
    ExecutorOptions,
    Local,
    ProcessPool,
    RayPool,
    SlurmPool,
    WorkerPool,
    make_executor,
)
from mmbalance.compare.methods import (
    METHOD_SETS,
    ComparedMethod,
    expand_methods,
    parse_method_spec,
    split_methods,
)
from mmbalance.compare.search import Candidate, SearchOutcome, best_candidate, search_candidates

__all__ = [
    "EXECUTORS",
    "METHOD_SETS",
    "Candidate",
    "CollectOnly",
    "ComparedMethod",
    "Comparison",
    "Executor",
    "ExecutorOptions",
    "Local",
    "PlannedRun",
    "ProcessPool",
    "RayPool",
    "RunSummary",
    "SearchOutcome",
    "Sequential",
    "SlurmPool",
    "WorkerPool",
    "best_candidate",
    "expand_methods",
    "make_executor",
    "parse_method_spec",
    "run_comparison",
    "run_or_reuse",
    "search_candidates",
    "split_methods",
]
