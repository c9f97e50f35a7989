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
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbalance.build import build_dataset, check_engine, normalized_config, resolve_config
from mmbalance.config import RunConfig, parse_value
from mmbalance.errors import ConfigError, DataError, MMBalanceError, TrainingDiverged
from mmbalance.io import read_json, remove_stale_temporaries, write_json_atomic
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


def split_methods(text: str) -> list[str]:
    """Split ``--methods`` at the commas outside brackets (``a,b[x=1,y=2]`` is two entries);
    empty items are dropped, and naming no method at all is an error."""
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
    return items


_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_]+)(\[(?P<options>.*)\])?")


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any] | None]:
    """``"ogm_ge[alpha=1.2,ge=false]"`` -> ``("ogm_ge", {"alpha": 1.2, "ge": False})``; a bare
    name gives ``(name, None)``. Values are read as YAML, as on the command line."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None or "/" in spec or "\\" in spec:  # the label names a directory
        raise ConfigError(f"method {spec!r} is not NAME or NAME[KEY=VALUE,...]")
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


def run_compare(
    methods: Sequence[str],
    seeds: int,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Train every method on ``seeds`` seeds and write ``out_dir/results.json``.

    Returns the tidy records ``{"method", "seed", "split", "metric", "value"}``, plus one
    status record for each run that did not finish (:func:`failed_runs` lists those).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
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
    from mmbalance.train.callbacks import default_callbacks
    from mmbalance.train.rundir import check_same_run, check_writable_dir

    check_writable_dir(out_dir)
    remove_stale_temporaries(out_dir, ["results.json"])
    runs = []
    for entry, cfg in zip(entries, configs, strict=True):
        check_engine(cfg)
        for seed in range(seeds):
            run_cfg = replace(cfg, train=replace(cfg.train, seed=seed))
            run_dir = out_dir / entry.label / f"seed{seed}"
            check_same_run(run_cfg, run_dir)
            runs.append((entry.label, seed, run_cfg, run_dir))
    records: list[dict[str, Any]] = []
    clock = RunClock(len(runs))
    for i, (label, seed, cfg, run_dir) in enumerate(runs):
        prefix = f"[{i + 1}/{len(runs)}] {label} seed {seed}"
        started = time.perf_counter()
        trained = not (run_dir / "metrics.json").is_file()
        try:
            if trained and cfg.train.progress:
                print(f"{prefix}: training{clock.eta_text()}", flush=True)
            result = run_or_reuse(cfg, run_dir, default_callbacks(cfg, prefix))
            records += run_records(label, seed, result)
        except TrainingDiverged as err:
            records.append(status_record(label, seed, "diverged", str(err)))
        except MMBalanceError as err:
            records.append(status_record(label, seed, "failed", str(err)))
        clock.finished(time.perf_counter() - started if trained else None)
    write_json_atomic(out_dir / "results.json", records, indent=1)
    return records


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
    if done.is_file():
        summary = read_json(done)
        if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
            raise DataError(f"{str(done)!r} is not a run's metrics.json; delete it to redo the run")
        return summary
    diverged = run_dir / "diverged.json"
    if diverged.is_file():
        why = read_json(diverged)
        raise TrainingDiverged(str(why.get("diverged") if isinstance(why, dict) else why))
    # A run directory that exists belongs to this comparison: resume whatever stage it reached
    # (a kill during unimodal pre-training leaves checkpoints only under ``pretrain/``).
    try:
        return fit(cfg, run_dir, resume=run_dir.exists(), callbacks=callbacks)
    except TrainingDiverged as err:
        write_json_atomic(diverged, {"diverged": str(err)})
        raise
