"""The ``mmbalance`` command line.

Errors caused by input (unknown names, invalid values, missing files, diverged runs) are printed
as one line on stderr with exit status 2; nobody has to read a traceback to fix a typo.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmbalance.config import (
    OptionDoc,
    config_path,
    docstring_summary,
    load_yaml,
    parse_overrides,
    value_text,
)
from mmbalance.errors import MMBalanceError


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config file (if any), then --dataset / --method, then key=value pairs (later wins)."""
    from mmbalance.plugins import load_plugins, plugin_specs, split_plugins

    values: dict[str, Any] = {}
    pairs = list(args.overrides)
    if pairs and pairs[0].endswith((".yaml", ".yml")) and "=" not in pairs[0]:
        path = config_path(pairs.pop(0))
        # the user passes this YAML file: the plugins it names are theirs to import
        plugins, flat = split_plugins(load_yaml(path))
        load_plugins(plugin_specs(plugins, str(path)), "config", base=path.parent)
        values.update(flat)
    if getattr(args, "dataset", None):
        values["dataset"] = args.dataset
    if getattr(args, "method", None):
        values["method"] = args.method
    values.update(parse_overrides(pairs))
    return values


def _out_dir(text: str | None, default: Path | None = None) -> Path | None:
    """The ``--out`` directory; an empty ``--out ""`` is refused (it would write into the
    current directory), an absent one gives ``default``."""
    if text is None:
        return default
    if not text.strip():
        from mmbalance.errors import ConfigError

        raise ConfigError('--out "" names no directory; give the directory to write into')
    return Path(text)


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _cmd_train(args: argparse.Namespace) -> int:
    from mmbalance.builder import resolve_config
    from mmbalance.train.rundir import resume_overrides

    overrides = _overrides(args)
    out = _out_dir(args.out)
    if args.resume and out is not None:
        # continue the saved configuration; the command may change only a few keys
        overrides = resume_overrides(out, overrides)
    cfg = resolve_config(overrides)  # names and options are checked before training imports
    if out is None:
        out = Path(f"runs/{cfg.dataset.name}-{cfg.method.name}-seed{cfg.train.seed}")
        if args.resume:
            cfg = resolve_config(resume_overrides(out, overrides))
    from mmbalance.train import fit

    result = fit(cfg, out, resume=args.resume)
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
    from mmbalance.api import compare
    from mmbalance.compare import ExecutorOptions

    out = _out_dir(args.out)
    assert out is not None
    options = ExecutorOptions(**{k: getattr(args, k) for k in EXECUTOR_OPTIONS.values()})
    result = compare(
        args.methods,
        out=out,
        seeds=args.seeds,
        search=args.search,
        overrides=_overrides(args),
        metrics=args.metrics,
        executor=args.executor,
        executor_options=options,
    )
    failed = result.failed
    if result.report_md is not None:  # some run finished
        # plain text that fits the terminal (80 columns in a log): never markup, never cut numbers
        print(result.table)
        print(f"results: {result.results}")
        if result.figure is not None:
            print(f"plot: {result.figure}")
        print(f"report: {result.report_md}\n        {result.report_html}")
    if failed:
        runs = ", ".join(f"{r['method']} seed {r['seed']} {r['value']}" for r in failed)
        raise MMBalanceError(
            f"{len(failed)} run(s) did not finish ({runs}); the others are in "
            f"{out / 'results.json'}, whose status records say why (first: {failed[0]['message']})"
        )
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from mmbalance.diagnose import diagnose, render_text

    plugins = [part for p in args.plugin for part in ("--plugin", p)]
    result = diagnose(_overrides(args), Path(args.out), seeds=args.seeds, command_options=plugins)
    print(render_text(result))
    print(
        f"diagnosis: {Path(args.out) / 'diagnosis.md'}\n           {Path(args.out) / 'diagnosis.json'}"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mmbalance.report import parse_metrics, write_report

    metrics = parse_metrics(args.metrics) if args.metrics else None
    md, page = write_report(args.dir, metrics=metrics)
    print(f"report: {md}\n        {page}")
    return 0


@dataclass(frozen=True)
class Component:
    """A registered component as ``mmbalance list`` shows it.

    Attributes:
        kind: method, dataset, encoder, fusion head or training settings.
        name: its registry name.
        summary: one paragraph of what it is.
        usage: how a run selects it and sets its options.
        options: its options, from its Params dataclass or its constructor's keywords.
        extra: further option tables as ``(title, usage, options)`` (a dataset's preparation).
        notes: lines printed under the summary (a dataset's recommended train settings).
        origin: built-in, or the plugin (name and file) or module that registered it.
    """

    kind: str
    name: str
    summary: str
    usage: str
    options: list[OptionDoc]
    extra: tuple[tuple[str, str, list[OptionDoc]], ...] = ()
    notes: tuple[str, ...] = ()
    origin: str = "built-in"


def registered_components() -> list[Component]:
    """Every method, dataset, encoder and fusion head, then the training settings, each with its
    options (the data of ``mmbalance list``; tests hold every option to having help text)."""
    from mmbalance.config import TrainConfig, dataclass_options, signature_options
    from mmbalance.data import DATASETS
    from mmbalance.methods import METHODS
    from mmbalance.models import ENCODERS, FUSION_HEADS

    out = [
        Component(
            "method",
            name,
            docstring_summary(cls),
            f"--method {name} method.OPTION=VALUE",
            dataclass_options(cls.Params),
            origin=METHODS.origin(name),
        )
        for name, cls in METHODS.items()
    ]
    for name, source in DATASETS.items():
        extra = ()
        if source.PrepareParams is not None:
            usage = f"mmbalance prepare {name} --OPTION VALUE"
            flags = [
                replace(o, name="--" + o.name.replace("_", "-"))
                for o in dataclass_options(source.PrepareParams)
            ]
            extra = (("preparation", usage, flags),)
        notes = tuple(source.guide)
        if source.train_defaults:
            pairs = (f"train.{k}={value_text(v)}" for k, v in source.train_defaults.items())
            notes += ("train defaults (your values win): " + " ".join(pairs),)
        out.append(
            Component(
                "dataset",
                name,
                source.description or docstring_summary(source),
                f"--dataset {name} dataset.OPTION=VALUE",
                dataclass_options(source.Params),
                extra,
                notes,
                DATASETS.origin(name),
            )
        )
    # encoders take the input shape, fusion heads the latent sizes and the number of outputs
    # from their builder; the rest of their constructors' parameters are the user's options
    out += [
        Component(
            "encoder",
            name,
            docstring_summary(factory),
            f"encoder.MODALITY={name} encoder.MODALITY.OPTION=VALUE",
            signature_options(factory, positional=1),
            origin=ENCODERS.origin(name),
        )
        for name, factory in ENCODERS.items()
    ]
    out += [
        Component(
            "fusion head",
            name,
            docstring_summary(cls),
            f"fusion={name} fusion.OPTION=VALUE",
            signature_options(cls, positional=2),
            origin=FUSION_HEADS.origin(name),
        )
        for name, cls in FUSION_HEADS.items()
    ]
    out.append(
        Component(
            "training settings",
            "train",
            docstring_summary(TrainConfig),
            "train.OPTION=VALUE or OPTION=VALUE",
            dataclass_options(TrainConfig),
        )
    )
    return out


def _wrapped(text: str, width: int, indent: str) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent) or [indent]


def format_options(component: Component, width: int = 80) -> str:
    """``mmbalance list NAME``: plain text (no markup, so no docstring text is lost) that fits
    ``width`` columns, one block per option: ``name: type = default``, then its help."""
    lines = [f"{component.name} ({component.kind})"]
    if component.origin != "built-in":
        lines.append(f"  from {component.origin}")  # a path is never broken
    lines += _wrapped(component.summary, width, "  ")
    for note in component.notes:
        lines += _wrapped(note, width, "  ")
    tables = [("options", component.usage, component.options), *component.extra]
    for title, usage, options in tables:
        lines.append("")
        lines += textwrap.wrap(
            f"{title}: {usage if options else 'none'}", width, subsequent_indent="    "
        )
        for option in options:
            default = "required" if option.required else f"= {value_text(option.default)}"
            head = f"{option.name}: {option.type} {default}"
            lines += textwrap.wrap(head, width, initial_indent="  ", subsequent_indent="      ")
            lines += _wrapped(option.help or "(undocumented)", width, "      ")
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    if args.name:
        return _list_one(args.name)
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="registered components")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("origin")
    table.add_column("description")
    for component in registered_components():
        if component.kind != "training settings":
            table.add_row(
                component.kind, component.name, escape(component.origin), escape(component.summary)
            )
    console = _console()
    console.print(table)
    console.print(
        escape(
            "`mmbalance list NAME` shows the options of one of them (type, default, help); "
            "`mmbalance list train` the training settings."
        )
    )
    return 0


def _list_one(name: str) -> int:
    import difflib
    import shutil

    from mmbalance.errors import ConfigError

    components = registered_components()
    found = [c for c in components if c.name == name]
    if not found:
        names = [c.name for c in components]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"{name!r} is no method, dataset, encoder, fusion head or train; {hint}"
            "`mmbalance list` names them all"
        )
    width = min(shutil.get_terminal_size((80, 24)).columns, 100)
    print("\n\n".join(format_options(c, width) for c in found))
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
    out = _out_dir(args.out)
    assert out is not None
    report = source.prepare(
        Path(args.raw), out, params, progress=not args.no_progress, console=console
    )
    source.print_prepare_report(report, console)
    console.print(f"report: {out / 'prepare_report.json'}")
    return 0


#: The ``key=value`` forms, for the help of ``train`` and ``compare`` (80 columns wide).
_KEY_FORMS = """\
keys (key=value anywhere after the command, later ones win; values are YAML:
0.1, true, [1, 2], null):
  dataset=NAME, dataset.OPTION=VALUE     the dataset and its options
  method=NAME, method.OPTION=VALUE       the balancing method and its options
  fusion=NAME, fusion.OPTION=VALUE       the fusion head and its options
  encoder.MODALITY=NAME, encoder.MODALITY.OPTION=VALUE
                                         one modality's encoder and its options
  unimodal_heads=true|false              unimodal heads on or off
  train.OPTION=VALUE or OPTION=VALUE     the training settings

the options of every component:
  mmbalance list          names every method, dataset, encoder and fusion head
  mmbalance list NAME     the options of NAME: type, default and help
  mmbalance list train    the training settings
"""


#: The executor flags of ``compare`` (and the accuracy benchmark) -> ``ExecutorOptions`` field.
EXECUTOR_OPTIONS = {
    "--jobs": "jobs",
    "--retries": "retries",
    "--ray-address": "ray_address",
    "--slurm-partition": "slurm_partition",
    "--slurm-time": "slurm_time",
    "--gpus-per-run": "gpus_per_run",
}


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor`` and its options (:class:`~mmbalance.compare.ExecutorOptions`)."""
    group = parser.add_argument_group("executor (where the runs train)")
    group.add_argument(
        "--executor",
        default="local",
        help="where the runs train (default %(default)s): local (one after another in this "
        "process), processes (--jobs runs at once on this machine), ray (Ray tasks; "
        "mmbalance[ray]), slurm (submitit jobs; mmbalance[slurm])",
    )
    group.add_argument(
        "--jobs", type=int, help="runs at once (processes: default 2; ray, slurm: all)"
    )
    group.add_argument(
        "--retries", type=int, help="times a failed or killed worker's run is retried (default 2)"
    )
    group.add_argument("--ray-address", help="the Ray cluster (default: a local Ray instance)")
    group.add_argument("--slurm-partition", help="the Slurm partition")
    group.add_argument("--slurm-time", type=int, help="each run's Slurm time limit, in minutes")
    group.add_argument("--gpus-per-run", type=int, help="GPUs per run (ray, slurm; default 0)")


#: The help of ``--metrics`` (``compare`` and ``report``).
METRICS_HELP = (
    "comma-separated metrics to tabulate, the first compared with joint: "
    "accuracy, macro_f1, balanced_accuracy, ece, robust_20|50|100 (the worst modality absent "
    "from that share of test samples), missing_50, noisy_50 (one column per modality), probe, "
    "head, head_ece (one per modality) or any metric key of metrics.json"
)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line too (its usage would take several), pointing to
    ``--help``; exit status 2 as for every bad input."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def version_text() -> str:
    """``mmbalance 0.1.0 (torch 2.13.0+cpu, lightning 2.6.6, Python 3.11.7)``: the library's
    version and those of the packages a run depends on, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    import mmbalance

    found = []
    for package in ("torch", "lightning"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    found.append(f"Python {sys.version.split()[0]}")
    return f"mmbalance {mmbalance.__version__} ({', '.join(found)})"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` and exit (computed only when asked for)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmbalance",
        description="Balanced multimodal training: methods, datasets, comparisons.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the versions of mmbalance, torch and lightning and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import your own components first: an importable module or a .py file that "
        "registers datasets, encoders, fusion heads or methods (repeatable)",
    )
    over_help = "optional CONFIG.yaml first, then key=value overrides (e.g. train.lr=0.01)"

    train = sub.add_parser(
        "train",
        parents=[plugin],
        help="train one run",
        description="Train one run and evaluate the validation-selected model.",
        epilog=_KEY_FORMS + "\nexample:\n  mmbalance train --dataset av-digits --method ogm_ge "
        "method.alpha=0.5 epochs=5\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--dataset", help="dataset name (as dataset=NAME)")
    train.add_argument("--method", help="method name (as method=NAME)")
    train.add_argument("--out", help="run directory (default runs/DATASET-METHOD-seedS)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved configuration (a command may change "
        "only train.epochs, upwards, and train.progress, train.tensorboard, train.num_workers)",
    )
    train.add_argument("overrides", nargs="*", help=over_help)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser(
        "evaluate", parents=[plugin], help="evaluate a run directory or checkpoint"
    )
    evaluate.add_argument("run", help="run directory or checkpoint file")
    evaluate.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    evaluate.set_defaults(func=_cmd_evaluate)

    compare = sub.add_parser(
        "compare",
        parents=[plugin],
        help="compare methods over seeds",
        description="Train every method of --methods with every seed, then write the\n"
        "comparison table, plot and report.",
        epilog=_KEY_FORMS
        + "\nexample:\n  mmbalance compare --dataset av-digits --methods joint,mcr,ogm_ge "
        "--out cmp\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("--dataset", help="dataset name (as dataset=NAME)")
    compare.add_argument(
        "--methods",
        required=True,
        help="comma-separated methods, variants or sets, e.g. joint,ogm_ge,ogm_ge[alpha=1.2]; "
        "sets: table1 (the MCR paper's Table 1), references (joint, ensemble, unimodal), all",
    )
    compare.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    compare.add_argument(
        "--search",
        action="store_true",
        help="first choose each method's main option on the validation split (three values, "
        "seed 0, the same budget for every method; OUT/search.json), then run the seeds",
    )
    compare.add_argument(
        "--metrics", help=METRICS_HELP + " (default: accuracy,macro_f1; MAE first for regression)"
    )
    compare.add_argument("--out", required=True, help="output directory")
    add_executor_arguments(compare)
    compare.add_argument("overrides", nargs="*", help=over_help)
    compare.set_defaults(func=_cmd_compare)

    diag = sub.add_parser(
        "diagnose",
        parents=[plugin],
        help="do the modalities compete? joint, the ensemble and each modality alone",
        description="Train joint and the ensemble of unimodal models with the dataset's recipe\n"
        "on a few seeds (reused like compare's runs), then say whether the modalities\n"
        "compete, with the numbers behind it, what to try next and the compare command.",
        epilog=_KEY_FORMS
        + "\nexample:\n  mmbalance diagnose --dataset av-fashion-cnn --out diag\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    diag.add_argument("--dataset", help="dataset name (as dataset=NAME)")
    diag.add_argument(
        "--seeds", type=int, default=3, help="seeds of joint and of the ensemble (default 3)"
    )
    diag.add_argument("--out", required=True, help="output directory (runs and diagnosis)")
    diag.add_argument("overrides", nargs="*", help=over_help)
    diag.set_defaults(func=_cmd_diagnose)

    prep = sub.add_parser(
        "prepare", parents=[plugin], help="turn a raw dataset release into a prepared directory"
    )
    prep.add_argument("dataset", help="dataset to prepare (an unknown name lists them)")
    prep.add_argument("--raw", required=True, help="root of the raw release")
    prep.add_argument("--out", required=True, help="prepared directory (dataset.root)")
    for flag, text in PREPARE_OPTIONS.items():
        prep.add_argument(flag, type=int, help=f"{text} (default: the dataset's)")
    prep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    prep.set_defaults(func=_cmd_prepare)

    report = sub.add_parser(
        "report", parents=[plugin], help="write report.md and report.html for a directory"
    )
    report.add_argument("dir", help="a compare output directory or a single run directory")
    report.add_argument("--metrics", help=METRICS_HELP)
    report.set_defaults(func=_cmd_report)

    lister = sub.add_parser(
        "list",
        parents=[plugin],
        help="list methods, datasets, encoders and fusion heads, or the options of one",
        description="Without NAME: every registered method, dataset, encoder and fusion head. "
        "With NAME: its options, each with its type, default and help; NAME=train: the "
        "training settings (train.OPTION=VALUE).",
    )
    lister.add_argument("name", nargs="?", help="a method, dataset, encoder, fusion head or train")
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


def _load_plugins(args: argparse.Namespace) -> None:
    """The installed plugins (entry points) and those of ``--plugin``, before the command."""
    from mmbalance.plugins import load_entry_points, load_plugins

    load_entry_points()
    load_plugins(getattr(args, "plugin", None) or [])


#: The longest error line the command prints (a message quoting a huge value is cut).
MAX_ERROR_CHARS = 1000


def one_line(message: str) -> str:
    """``message`` on one line of at most :data:`MAX_ERROR_CHARS` characters."""
    text = " ".join(message.splitlines())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        _load_plugins(args)
        return int(args.func(args))
    except MMBalanceError as err:
        print(f"mmbalance: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmbalance: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
