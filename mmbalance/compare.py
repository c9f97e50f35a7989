"""Compare methods over seeds: train every (method, seed) run, then tabulate and plot.

Methods are names or variants. ``ogm_ge[alpha=1.2]`` trains ``ogm_ge`` with ``alpha=1.2`` under
the label ``ogm_ge[alpha=1.2]``, exactly as spelled, in results and in its run directories
``OUT/LABEL/seedS``; a bare name expands through :meth:`Method.variants` (``unimodal`` becomes
one entry per modality). Options given as ``method.KEY=V`` next to ``--methods`` apply to every
compared method that has an option ``KEY`` and to no other (one that none has is an error);
bracketed options override them.

Every run is keyed by its resolved configuration. A run directory is reused (finished) or
resumed (interrupted) only if it holds the same configuration, up to the settings that cannot
change the numbers (:data:`mmbalance.config.PRESENTATION_KEYS`); otherwise the comparison is
refused, naming the differing keys. Two entries resolving to the same configuration (``joint,
joint``) are refused as well. All of this is checked before the first run trains, so re-running
the same command after a kill finishes the comparison without redoing work, and a changed
command never mixes old runs into new results.

A run that diverges (or fails with another user-facing error) does not end the comparison: it is
recorded in ``results.json`` as one status record (see :func:`status_record`) and the others go
on; the command exits non-zero at the end, after writing the results of the runs that finished.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbalance.build import build_dataset, check_engine, normalized_config, resolve_config
from mmbalance.config import RunConfig, parse_value
from mmbalance.errors import ConfigError, DataError, MMBalanceError, TrainingDiverged, shown
from mmbalance.io import (
    claim_output,
    is_written_file,
    output_lock,
    read_json,
    remove_stale_temporaries,
    write_json_atomic,
)
from mmbalance.methods import METHODS
from mmbalance.report import run_records, status_record

if TYPE_CHECKING:
    from mmbalance.train import Callback, RunResult


@dataclass(frozen=True)
class Entry:
    """One compared configuration: a label, a method name and its options."""

    label: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()


#: Named sets of methods, usable in ``--methods`` (``--methods table1`` or ``table1,umt``).
#: ``table1``: the rows of the MCR paper's Table 1 (Kontras et al., NeurIPS 2025): the unimodal
#: models, their ensemble, joint training, multi-loss, the unimodal pre-training baselines, the
#: eight published methods (OGM as the OGM-GE its code runs) and MCR. ``recent``: the 2025
#: methods that later papers compare against (AUG, DGL, G2D, Data Remixing, MIDAS).
#: ``references``: what every balancing method is judged against. ``all``: every registered
#: method.
METHOD_SETS: dict[str, tuple[str, ...]] = {
    "table1": (
        "unimodal",
        "ensemble",
        "joint",
        "multiloss",
        "unipre_frozen",
        "unipre_finetuned",
        "mslr",
        "mmcosine",
        "ogm_ge",
        "agm",
        "mlb",
        "reconboost",
        "mmpareto",
        "dr",
        "mcr",
    ),
    "recent": ("aug", "dgl", "g2d", "remix", "midas"),
    "references": ("joint", "ensemble", "unimodal"),
}


def method_set(name: str) -> tuple[str, ...] | None:
    """The methods of a named set (``all``: every registered method, joint first), or None."""
    if name == "all":
        return ("joint", *(m for m in METHODS.names() if m != "joint"))
    return METHOD_SETS.get(name)


def split_methods(text: str) -> list[str]:
    """Split ``--methods`` at the commas outside brackets (``a,b[x=1,y=2]`` is two entries) and
    expand named sets (:data:`METHOD_SETS`, ``all``), keeping the first mention of a method
    that a set and the list both name; empty items are dropped, and naming no method at all is
    an error."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items = [m for m in [*items, current.strip()] if m]
    if not items:
        raise ConfigError(f"--methods {text!r} names no method")
    if not any(method_set(m) for m in items):
        return items
    expanded: list[str] = []
    for item in items:
        for m in method_set(item) or (item,):
            if m not in expanded:
                expanded.append(m)
    return expanded


#: The most seeds a comparison runs per method.
MAX_SEEDS = 1000
#: The longest method label: it names a directory (file systems allow 255 bytes per name).
MAX_LABEL_BYTES = 120

_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_]+)(\[(?P<options>.*)\])?")


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any] | None]:
    """``"ogm_ge[alpha=1.2,ge=false]"`` -> ``("ogm_ge", {"alpha": 1.2, "ge": False})``; a bare
    name gives ``(name, None)``. Values are read as YAML, as on the command line."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None or "/" in spec or "\\" in spec:  # the label names a directory
        raise ConfigError(f"method {shown(spec)} is not NAME or NAME[KEY=VALUE,...]")
    if len(spec.strip().encode()) > MAX_LABEL_BYTES or any(ord(c) < 32 for c in spec):
        raise ConfigError(
            f"method {shown(spec)} is longer than {MAX_LABEL_BYTES} bytes or holds control "
            "characters; its label names its runs' directory"
        )
    if match["options"] is None:
        return match["name"], None
    options: dict[str, Any] = {}
    for pair in split_methods(match["options"]) if match["options"].strip() else []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method {spec!r}: expected KEY=VALUE, got {pair!r}")
        options[key.strip()] = parse_value(value.strip())
    return match["name"], options


def expand_methods(names: Sequence[str], modalities: Sequence[str]) -> list[Entry]:
    """Turn method names and variants into compared entries: a bare name through its
    :meth:`Method.variants`, ``NAME[KEY=V,...]`` as one entry labelled as spelled."""
    entries: list[Entry] = []
    for spec in names:
        name, options = parse_method_spec(spec)
        cls = METHODS.get(name)  # unknown names fail here, before anything trains
        if options is None:
            for label, params in cls.variants(name, modalities):
                entries.append(Entry(label, name, tuple(sorted(params.items()))))
        else:
            entries.append(Entry(spec.strip(), name, tuple(options.items())))
    seen: set[str] = set()
    for e in entries:
        if e.label in seen:
            raise ConfigError(f"--methods lists {e.label!r} twice")
        seen.add(e.label)
    return entries


def _method_options(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split overrides into the shared ones and the method-scoped ``method.KEY`` options (a
    ``method=NAME`` there, e.g. from a training YAML, is superseded by ``--methods``)."""
    shared = {k: v for k, v in overrides.items() if k != "method" and not k.startswith("method.")}
    scoped = {k.removeprefix("method."): v for k, v in overrides.items() if k.startswith("method.")}
    return shared, scoped


def entry_configs(entries: Sequence[Entry], overrides: Mapping[str, Any]) -> list[RunConfig]:
    """The validated configuration of every entry (seed from ``overrides``), refusing a
    method-scoped option that no compared method has and two entries that are the same run."""
    shared, scoped = _method_options(overrides)
    used: set[str] = set()
    configs = []
    for e in entries:
        fields = {f.name for f in dataclasses.fields(METHODS.get(e.method).Params)}
        options = {k: v for k, v in scoped.items() if k in fields} | dict(e.params)
        used |= options.keys() & scoped.keys()
        configs.append(
            resolve_config(
                {**shared, "method": e.method, **{f"method.{k}": v for k, v in options.items()}}
            )
        )
    unused = [k for k in scoped if k not in used]
    if unused:
        names = ", ".join(dict.fromkeys(e.method for e in entries))
        raise ConfigError(
            f"method.{unused[0]} is an option of none of the compared methods ({names})"
        )
    keys = [normalized_config(c) for c in configs]
    for i, key in enumerate(keys):
        for j in range(i):
            if keys[j] == key:
                raise ConfigError(
                    f"{entries[j].label} and {entries[i].label} are the same configuration; "
                    "compare each configuration once"
                )
    return configs


@dataclass(frozen=True)
class Candidate:
    """One value of an entry's searched option: its configuration and run directory."""

    label: str
    option: str
    value: float
    config: RunConfig
    run_dir: Path


def with_option(cfg: RunConfig, option: str, value: Any) -> RunConfig:
    """``cfg`` with one option set: ``method.KEY``, ``fusion.KEY`` or ``train.FIELD`` (validated
    like any configuration)."""
    from mmbalance.build import validate

    section, _, key = option.partition(".")
    if section in ("method", "fusion"):
        named = getattr(cfg, section)
        cfg = replace(cfg, **{section: replace(named, params={**named.params, key: value})})
    elif section == "train" and hasattr(cfg.train, key):
        cfg = replace(cfg, train=replace(cfg.train, **{key: value}))
    else:
        raise ConfigError(f"cannot search option {option!r}: not a method, fusion or train option")
    validate(cfg)
    return cfg


def search_candidates(entry: Entry, cfg: RunConfig, out_dir: Path) -> list[Candidate]:
    """The equal-budget search of one entry: three values of its method's main option
    (:attr:`Method.search_space`; without one, the learning rate at 0.5x, 1x and 2x), each one
    run on seed 0 under ``out_dir/search/LABEL/OPTION=V``. An option the entry fixes itself
    (``mcr[lam=1]``) is not searched: the entry has one candidate, its own."""
    option, values = METHODS.get(entry.method).searched_option()
    if option.startswith("method.") and option.removeprefix("method.") in dict(entry.params):
        values = (dict(entry.params)[option.removeprefix("method.")],)
    out = []
    for value in values:
        actual = value * cfg.train.lr if option == "train.lr" else value
        config = with_option(replace(cfg, train=replace(cfg.train, seed=0)), option, actual)
        run_dir = out_dir / "search" / entry.label / f"{option}={value:g}" / "seed0"
        out.append(Candidate(entry.label, option, value, config, run_dir))
    return out


def choose(candidates: Sequence[Candidate], scores: Sequence[tuple[float, float] | None]) -> int:
    """The candidate with the best validation selection key (:func:`selection_key`: the
    primary metric, then minus the loss); a failed run never wins; ties go to the middle value
    (the default-like one)."""
    middle = len(candidates) // 2
    ranked = [
        ((s if s is not None else (-math.inf, -math.inf)), i == middle, -i)
        for i, s in enumerate(scores)
    ]
    return max(range(len(candidates)), key=lambda i: ranked[i])


def run_compare(
    methods: Sequence[str],
    seeds: int,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
    search: bool = False,
) -> list[dict[str, Any]]:
    """Train every method on ``seeds`` seeds and write ``out_dir/results.json``.

    Returns the tidy records ``{"method", "seed", "split", "metric", "value"}``, plus one
    status record for each run that did not finish (:func:`failed_runs` lists those).

    With ``search``, every entry first runs the equal-budget validation search of
    :func:`search_candidates` (seed 0; the test split is never looked at), and its seeds then
    train with the chosen value; ``out_dir/search.json`` records every candidate's validation
    score and the choice.
    """
    if not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be in [1, {MAX_SEEDS}], got {shown(seeds)}")
    if not methods:
        raise ConfigError("--methods names no method")
    out_dir = Path(out_dir)
    for spec in methods:  # every name is checked before any module is imported
        METHODS.require(parse_method_spec(spec)[0])
    shared, _ = _method_options(overrides)
    data = build_dataset(resolve_config(shared))
    entries = expand_methods(methods, list(data.modalities))
    # validate every configuration and every existing run directory before the first run
    configs = entry_configs(entries, overrides)
    # training is imported once every name and option is known to be valid (fast errors)
    from mmbalance.train.rundir import check_same_run

    for cfg in configs:
        check_engine(cfg)
    claim_output(out_dir, "comparison")
    with output_lock(out_dir):
        remove_stale_temporaries(out_dir, ["results.json", "search.json"])
        if search:
            configs = _search(entries, configs, out_dir, data.task)
        runs = []
        for entry, cfg in zip(entries, configs, strict=True):
            for seed in range(seeds):
                run_cfg = replace(cfg, train=replace(cfg.train, seed=seed))
                run_dir = out_dir / entry.label / f"seed{seed}"
                check_same_run(run_cfg, run_dir)
                runs.append((entry.label, seed, run_cfg, run_dir))
        records: list[dict[str, Any]] = []
        for label, seed, result in _train_all(runs):
            if isinstance(result, MMBalanceError):
                status = "diverged" if isinstance(result, TrainingDiverged) else "failed"
                records.append(status_record(label, seed, status, str(result)))
            else:
                records += run_records(label, seed, result)
        write_json_atomic(out_dir / "results.json", records, indent=1)
    return records


def _train_all(
    runs: Sequence[tuple[str, int, RunConfig, Path]], title: str = ""
) -> list[tuple[str, int, RunResult | dict[str, Any] | MMBalanceError]]:
    """Train (or reuse) every run in order, with a run counter and an estimate of the time
    left; a run that diverges or fails with a user-facing error gives that error as its result
    and the others go on."""
    from mmbalance.train.callbacks import default_callbacks

    out: list[tuple[str, int, RunResult | dict[str, Any] | MMBalanceError]] = []
    clock = RunClock(len(runs))
    for i, (label, seed, cfg, run_dir) in enumerate(runs):
        prefix = f"[{i + 1}/{len(runs)}] {title}{label} seed {seed}"
        started = time.perf_counter()
        trained = not is_written_file(run_dir / "metrics.json")
        try:
            if trained and cfg.train.progress:
                print(f"{prefix}: training{clock.eta_text()}", flush=True)
            out.append((label, seed, run_or_reuse(cfg, run_dir, default_callbacks(cfg, prefix))))
        except MMBalanceError as err:
            out.append((label, seed, err))
        clock.finished(time.perf_counter() - started if trained else None)
    return out


def _reuse_search_run(source: Path, target: Path) -> None:
    """Copy the chosen value's finished search run (seed 0, the same configuration) to the
    entry's ``seed0`` directory when that does not exist yet, so that it is not trained again
    (copied into a temporary directory, then renamed: a kill leaves no half copy)."""
    import os
    import shutil
    import tempfile

    if os.path.lexists(target) or not (source / "metrics.json").is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # an unpredictable name, created exclusively: nothing can be planted under it beforehand
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        # links inside the source are copied as links, never followed
        shutil.copytree(source, partial, symlinks=True, dirs_exist_ok=True)
        os.chmod(partial, 0o777 & ~_umask())
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _search(
    entries: Sequence[Entry], configs: Sequence[RunConfig], out_dir: Path, task: str
) -> list[RunConfig]:
    """Run every entry's search (:func:`search_candidates`) and return the chosen configs."""
    from mmbalance.eval.metrics import selection_key
    from mmbalance.train.rundir import check_same_run

    plans = [search_candidates(e, c, out_dir) for e, c in zip(entries, configs, strict=True)]
    for candidate in (c for plan in plans for c in plan):
        check_same_run(candidate.config, candidate.run_dir)
    runs = [
        (f"{c.label} {c.option}={c.value:g}", 0, c.config, c.run_dir)
        for plan in plans
        for c in plan
    ]
    results = iter(_train_all(runs, "search: "))
    chosen, summary = [], []
    for entry, plan in zip(entries, plans, strict=True):
        scores: list[tuple[float, float] | None] = []
        for _ in plan:
            _, _, result = next(results)
            if isinstance(result, MMBalanceError):
                scores.append(None)
                continue
            metrics = result["metrics"] if isinstance(result, dict) else result.metrics
            scores.append(selection_key(metrics["val"], task))
        best = choose(plan, scores)
        chosen.append(plan[best].config)  # seed 0, as every search run
        _reuse_search_run(plan[best].run_dir, out_dir / entry.label / "seed0")
        summary.append(
            {
                "method": entry.label,
                "option": plan[best].option,
                "scores": {
                    f"{c.value:g}": s[0] if s else None for c, s in zip(plan, scores, strict=True)
                },
                "chosen": plan[best].value,
            }
        )
        if chosen[-1].train.progress:
            print(f"search: {entry.label}: {plan[best].option}={plan[best].value:g}", flush=True)
    write_json_atomic(out_dir / "search.json", summary, indent=1)
    return chosen


class RunClock:
    """Estimates the time a comparison has left from the runs it trained so far (reused runs
    take no time and are not counted)."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.durations: list[float] = []

    def finished(self, seconds: float | None) -> None:
        self.left -= 1
        if seconds is not None:
            self.durations.append(seconds)

    def eta_text(self) -> str:
        if not self.durations:
            return ""
        from mmbalance.train.callbacks import format_seconds

        mean = sum(self.durations) / len(self.durations)
        return f" (about {format_seconds(mean * self.left)} left for {self.left} runs)"


def run_or_reuse(
    cfg: RunConfig, run_dir: Path, callbacks: Sequence[Callback] | None = None
) -> RunResult | dict[str, Any]:
    """The saved ``metrics.json`` of a finished run, or train it (resuming what exists).

    ``run_dir`` must hold the same configuration (or nothing); a run that diverged before is
    not retrained (its ``diverged.json`` says why, and it would diverge again identically).
    Raises :class:`TrainingDiverged` for a diverged run.
    """
    from mmbalance.train import fit
    from mmbalance.train.rundir import check_same_run

    run_dir = Path(run_dir)
    check_same_run(cfg, run_dir)
    done = run_dir / "metrics.json"
    if is_written_file(done):
        summary = read_json(done)
        if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
            raise DataError(f"{str(done)!r} is not a run's metrics.json; delete it to redo the run")
        return summary
    diverged = run_dir / "diverged.json"
    if is_written_file(diverged):
        why = read_json(diverged)
        raise TrainingDiverged(str(why.get("diverged") if isinstance(why, dict) else why))
    # A run directory that exists belongs to this comparison: resume whatever stage it reached
    # (a kill during unimodal pre-training leaves checkpoints only under ``pretrain/``).
    try:
        return fit(cfg, run_dir, resume=run_dir.exists(), callbacks=callbacks)
    except TrainingDiverged as err:
        write_json_atomic(diverged, {"diverged": str(err)})
        raise
