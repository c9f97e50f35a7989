"""The ``mmbalance`` command line.

Errors caused by input (unknown names, invalid values, missing files, diverged runs) are printed
as one line on stderr with exit status 2; nobody has to read a traceback to fix a typo.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmbalance.config import load_yaml, parse_overrides
from mmbalance.errors import MMBalanceError


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config file (if any), then --dataset / --method, then key=value pairs (later wins)."""
    values: dict[str, Any] = {}
    pairs = list(args.overrides)
    if pairs and pairs[0].endswith((".yaml", ".yml")) and "=" not in pairs[0]:
        values.update(load_yaml(pairs.pop(0)))
    if getattr(args, "dataset", None):
        values["dataset"] = args.dataset
    if getattr(args, "method", None):
        values["method"] = args.method
    values.update(parse_overrides(pairs))
    return values


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _cmd_train(args: argparse.Namespace) -> int:
    from mmbalance.build import resolve_config
    from mmbalance.train import fit
    from mmbalance.train.rundir import resume_overrides

    overrides = _overrides(args)
    if args.out:
        out = Path(args.out)
    else:
        cfg = resolve_config(overrides)
        out = Path(f"runs/{cfg.dataset.name}-{cfg.method.name}-seed{cfg.train.seed}")
    if args.resume:  # continue the saved configuration; the command may change only a few keys
        overrides = resume_overrides(out, overrides)
    result = fit(resolve_config(overrides), out, resume=args.resume)
    console = _console()
    # the number metrics.json and metrics.csv use: epochs count from 0
    console.print(
        f"[bold]run[/bold] {out}  best epoch {result.best_epoch} of {result.epochs_run} "
        "(counted from 0, as in metrics.json)"
    )
    _print_metrics(console, result.metrics, result.bayes_accuracy)
    return 0


def _print_metrics(console: Any, metrics: dict[str, dict[str, float]], bayes: float | None) -> None:
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    for split in metrics:
        table.add_column(split, justify="right")
    names = list(dict.fromkeys(k for m in metrics.values() for k in m))
    for name in names:
        table.add_row(
            name, *(f"{metrics[s][name]:.4f}" if name in metrics[s] else "-" for s in metrics)
        )
    if bayes is not None:
        table.add_row("bayes_accuracy", "", f"{bayes:.4f}")
    console.print(table)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mmbalance.train import evaluate_run

    metrics = evaluate_run(args.run)
    _print_metrics(_console(), metrics, None)
    if args.json:
        print(json.dumps(metrics))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mmbalance.compare import run_compare, split_methods
    from mmbalance.report import (
        comparison_table,
        epoch_seconds,
        failed_runs,
        load_source,
        plot_comparison,
        to_text,
        write_report,
    )

    methods = split_methods(args.methods)
    out = Path(args.out)
    records = run_compare(methods, args.seeds, out, _overrides(args))
    failed = failed_runs(records)
    if len(failed) < len({(r["method"], r["seed"]) for r in records}):  # some run finished
        # plain text that fits the terminal (80 columns in a log): never markup, never cut numbers
        seconds = epoch_seconds(load_source(out).histories())
        print(to_text(comparison_table(records, epoch_seconds=seconds)))
        figure = plot_comparison(records, out / "comparison.png")
        md, page = write_report(out)
        print(f"results: {out / 'results.json'}")
        if figure is not None:
            print(f"plot: {figure}")
        print(f"report: {md}\n        {page}")
    if failed:
        runs = ", ".join(f"{r['method']} seed {r['seed']} {r['value']}" for r in failed)
        raise MMBalanceError(
            f"{len(failed)} run(s) did not finish ({runs}); the others are in "
            f"{out / 'results.json'}, whose status records say why (first: {failed[0]['message']})"
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mmbalance.report import write_report

    md, page = write_report(args.dir)
    print(f"report: {md}\n        {page}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mmbalance.data import DATASETS
    from mmbalance.methods import METHODS
    from mmbalance.models import ENCODERS, FUSION_HEADS

    table = Table(title="registered components")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("description")
    for kind, registry in (
        ("method", METHODS),
        ("dataset", DATASETS),
        ("encoder", ENCODERS),
        ("fusion head", FUSION_HEADS),
    ):
        for name, obj in registry.items():
            doc = getattr(obj, "description", "") or (obj.__doc__ or "").strip().split("\n")[0]
            table.add_row(kind, name, doc)
    _console().print(table)
    return 0


#: The options of ``mmbalance prepare`` (flag -> help). Each preparable dataset accepts those
#: that its ``PrepareParams`` has as fields (a test checks that every field has its flag); an
#: option given to a dataset without that field is an error.
PREPARE_OPTIONS = {
    "--workers": "parallel processes",
    "--image-size": "frame side in pixels",
    "--fbank-frames": "fbank length in 10 ms frames (datasets with audio)",
    "--clip-frames": "RGB and flow frames kept per clip (datasets with optical flow)",
}


def _cmd_prepare(args: argparse.Namespace) -> int:
    import dataclasses

    from mmbalance.config import build_dataclass
    from mmbalance.data import DATASETS, preparable_datasets
    from mmbalance.errors import ConfigError

    known = preparable_datasets()
    if args.dataset not in known:
        raise ConfigError(
            f"dataset {args.dataset!r} needs no preparation or is not registered; "
            f"prepare knows: {', '.join(known)}"
        )
    source = DATASETS.get(args.dataset)
    assert source.PrepareParams is not None
    flags = {flag.removeprefix("--").replace("-", "_"): flag for flag in PREPARE_OPTIONS}
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    accepted = [f.name for f in dataclasses.fields(source.PrepareParams)]
    stray = [flags[name] for name in given if name not in accepted]
    if stray:
        own = ", ".join(flags.get(name, name) for name in accepted)
        raise ConfigError(f"{stray[0]} does not apply to {args.dataset}; its options: {own}")
    # options not given keep the dataset's defaults
    params = build_dataclass(source.PrepareParams, given, "prepare")
    console = _console()
    out = Path(args.out)
    report = source.prepare(
        Path(args.raw), out, params, progress=not args.no_progress, console=console
    )
    source.print_prepare_report(report, console)
    console.print(f"report: {out / 'prepare_report.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmbalance",
        description="Balanced multimodal training: methods, datasets, comparisons.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    over_help = "optional CONFIG.yaml first, then key=value overrides (e.g. train.lr=0.01)"

    train = sub.add_parser("train", help="train one run")
    train.add_argument("--dataset")
    train.add_argument("--method")
    train.add_argument("--out", help="run directory (default runs/DATASET-METHOD-seedS)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved configuration (a command may change "
        "only train.epochs, upwards, and train.progress, train.tensorboard, train.num_workers)",
    )
    train.add_argument("overrides", nargs="*", help=over_help)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a run directory or checkpoint")
    evaluate.add_argument("run", help="run directory or checkpoint file")
    evaluate.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    evaluate.set_defaults(func=_cmd_evaluate)

    compare = sub.add_parser("compare", help="compare methods over seeds")
    compare.add_argument("--dataset")
    compare.add_argument(
        "--methods",
        required=True,
        help="comma-separated methods or variants, e.g. joint,ogm_ge,ogm_ge[alpha=1.2]",
    )
    compare.add_argument("--seeds", type=int, default=3)
    compare.add_argument("--out", required=True, help="output directory")
    compare.add_argument("overrides", nargs="*", help=over_help)
    compare.set_defaults(func=_cmd_compare)

    prep = sub.add_parser("prepare", help="turn a raw dataset release into a prepared directory")
    prep.add_argument("dataset", help="dataset to prepare (an unknown name lists them)")
    prep.add_argument("--raw", required=True, help="root of the raw release")
    prep.add_argument("--out", required=True, help="prepared directory (dataset.root)")
    for flag, text in PREPARE_OPTIONS.items():
        prep.add_argument(flag, type=int, help=f"{text} (default: the dataset's)")
    prep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    prep.set_defaults(func=_cmd_prepare)

    report = sub.add_parser("report", help="write report.md and report.html for a directory")
    report.add_argument("dir", help="a compare output directory or a single run directory")
    report.set_defaults(func=_cmd_report)

    lister = sub.add_parser("list", help="list methods, datasets, encoders and fusion heads")
    lister.set_defaults(func=_cmd_list)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may sit anywhere among the options
    (argparse alone takes one contiguous run of positionals and rejects the rest)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args))
    except MMBalanceError as err:
        print(f"mmbalance: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmbalance: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
