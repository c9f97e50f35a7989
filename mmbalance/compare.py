"""Compare methods over seeds: train every (method, seed) run and collect tidy records.

``compare`` is resumable: a finished run (its ``metrics.json`` exists) is reused and an
interrupted one resumes from its last checkpoint, so re-running the same command after a kill
finishes the comparison without redoing work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.build import build_dataset, resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.report import run_records
from mmbalance.train.loop import RunResult, fit


@dataclass(frozen=True)
class Entry:
    """One compared configuration: a label, a method name and its options."""

    label: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()


def expand_methods(names: Sequence[str], modalities: Sequence[str]) -> list[Entry]:
    """Turn method names into compared entries, using each method's :meth:`Method.variants`
    (``unimodal`` becomes one entry per modality, so the table shows every modality alone)."""
    entries: list[Entry] = []
    for name in names:
        cls = METHODS.get(name)  # unknown names fail here, before anything trains
        for label, params in cls.variants(name, modalities):
            entries.append(Entry(label, name, tuple(sorted(params.items()))))
    return entries


def run_compare(
    methods: Sequence[str],
    seeds: int,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Train every method on ``seeds`` seeds and write ``out_dir/results.json``.

    Returns the tidy records ``{"method", "seed", "split", "metric", "value"}``.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out_dir = Path(out_dir)
    base = resolve_config(overrides)
    data = build_dataset(base)
    entries = expand_methods(methods, list(data.modalities))
    # validate every configuration before the first run starts
    configs = {
        e: resolve_config(
            {**overrides, "method": e.method, **{f"method.{k}": v for k, v in e.params}}
        )
        for e in entries
    }
    records: list[dict[str, Any]] = []
    for entry in entries:
        for seed in range(seeds):
            cfg = configs[entry]
            cfg.train.seed = seed
            run_dir = out_dir / entry.label / f"seed{seed}"
            result = run_or_reuse(cfg, run_dir)
            records += run_records(entry.label, seed, result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(records, indent=1))
    return records


def run_or_reuse(cfg: Any, run_dir: Path) -> RunResult | dict[str, Any]:
    """The saved ``metrics.json`` of a finished run, or train it (resuming what exists)."""
    done = run_dir / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    # A run directory that exists belongs to this comparison: resume whatever stage it reached
    # (a kill during unimodal pre-training leaves checkpoints only under ``pretrain/``).
    return fit(cfg, run_dir, resume=run_dir.exists())
