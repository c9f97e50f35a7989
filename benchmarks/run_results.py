"""Regenerate ``docs/results.md``: what every method costs and what it buys.

One command, a few hours on 2 CPU cores (about 40 minutes for the competition regime and its SGD arm)::

    python3 benchmarks/run_results.py                 # cost + accuracy + docs
    python3 benchmarks/run_results.py --stage docs    # rewrite the page from saved results

Stages:

* ``cost``: :mod:`benchmarks.bench_cost` (step time of every method relative to ``joint``,
  interleaved, medians; peak memory) -> ``benchmarks/results/cost_cpu.json``.
* ``accuracy``: every registered method on every study of
  :mod:`benchmarks.results_page.studies`, hyperparameters chosen on the validation split by the
  same small search for every method, then 5 seeds of the chosen setting, each study one
  comparison per setting through :func:`mmbalance.compare.run_comparison` (the search and its
  choosing rule of ``mmbalance compare --search``; :mod:`benchmarks.results_page.runner`) ->
  ``benchmarks/results/accuracy.json`` (tidy records)
  and the run directories under ``--runs`` (resumable: finished runs are reused, so a killed
  regeneration continues; ``--collect-only`` trains nothing and collects the runs that exist).
  The runs go to the executor of ``mmbalance compare --executor`` (default here: ``processes``
  with ``--jobs 2``; ``ray`` and ``slurm`` with their options, Slurm's logs in ``--runs``).
* ``docs``: ``docs/results.md`` and its figures under ``docs/figures/``
  (:mod:`benchmarks.results_page.page`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` and ``mmbalance`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.results_page import RESULTS  # noqa: E402
from benchmarks.results_page.studies import STUDIES  # noqa: E402
from mmbalance.cli import EXECUTOR_OPTIONS, add_executor_arguments  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "cost", "accuracy", "docs"), default="all")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", default="runs/results", help="run directories (resumable)")
    parser.add_argument(
        "--studies", default=",".join(s.name for s in STUDIES), help="comma-separated subset"
    )
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="accuracy stage: train nothing, collect the runs that exist under --runs",
    )
    add_executor_arguments(parser)
    parser.set_defaults(executor="processes")
    args = parser.parse_args(argv)
    wanted = args.studies.split(",")
    unknown = set(wanted) - {s.name for s in STUDIES}
    if unknown:
        parser.error(f"unknown studies {sorted(unknown)}; known: {[s.name for s in STUDIES]}")
    if args.stage in ("all", "cost"):
        from benchmarks.bench_cost import run_cost

        run_cost(RESULTS, quick=False, device="cpu", threads=2)
    if args.stage in ("all", "accuracy"):
        from benchmarks.results_page.runner import run_accuracy
        from mmbalance.compare import ExecutorOptions, make_executor
        from mmbalance.errors import MMBalanceError

        studies = [s for s in STUDIES if s.name in wanted]
        methods = args.methods.split(",") if args.methods else None
        options = ExecutorOptions(**{k: getattr(args, k) for k in EXECUTOR_OPTIONS.values()})
        try:
            executor = make_executor(args.executor, options, Path(args.runs))
        except MMBalanceError as err:
            parser.error(str(err))
        workers = getattr(executor, "jobs", None) or 1
        run_accuracy(
            Path(args.runs),
            workers,
            args.seeds,
            studies,
            methods,
            not args.collect_only,
            executor=executor,
        )
    from benchmarks.results_page.page import write_docs
    from mmbalance.io import read_json

    cost_path, acc_path = RESULTS / "cost_cpu.json", RESULTS / "accuracy.json"
    cost = read_json(cost_path) if cost_path.is_file() else None
    saved = read_json(acc_path) if acc_path.is_file() else None
    print(f"wrote {write_docs(saved, cost)}")


if __name__ == "__main__":
    main()
