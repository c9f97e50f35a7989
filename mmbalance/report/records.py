"""Tidy records and the run files a report reads.

A *record* is one number: ``{"method", "seed", "split", "metric", "value"}`` (the benchmarks add
their own keys, such as ``study``). :func:`run_records` turns the summary of one run (its
``metrics.json``) into records; :func:`load_source` reads a compare directory (``results.json``
plus one run directory per method and seed) or a single run directory.

Everything read from disk goes through :func:`read_json` and friends, which turn a truncated or
malformed file into a one-line :class:`~mmbalance.errors.DataError` naming the file.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.config import load_config_yaml
from mmbalance.errors import ConfigError, DataError, shown
from mmbalance.io import check_path_usable, read_json, read_text

#: The keys of every record.
RECORD_KEYS = ("method", "seed", "split", "metric", "value")
#: The metric a diverged run records (value 1.0) in place of its results (benchmark records).
DIVERGED = "diverged"
#: ``split`` and ``metric`` of the record a comparison writes for a run that did not finish; its
#: ``value`` is ``"diverged"`` or ``"failed"`` and its ``message`` says why.
STATUS_SPLIT, STATUS_METRIC = "run", "status"


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping (a run's ``config.yaml``), or a :class:`DataError` (aliases and deep
    nesting are refused, see :class:`~mmbalance.config.ConfigLoader`)."""
    try:
        content = load_config_yaml(read_text(path, limit=1 << 20), repr(str(path)))
    except (OSError, ConfigError) as err:
        raise DataError(f"{str(path)!r} cannot be read as YAML ({shown(str(err), 100)})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise DataError(f"{str(path)!r} does not hold a mapping of configuration sections")
    return content


def read_history(path: Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as floats (NaN where a row lacks a value); ``[]``
    when the file does not exist."""
    if not path.is_file():
        return []
    try:
        with io.StringIO(read_text(path), newline="") as fh:
            return [
                {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(fh)
            ]
    except (ValueError, TypeError, csv.Error):
        raise DataError(f"{str(path)!r} is damaged (a value is not a number)") from None


def read_step_logs(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``steps.csv`` (``step``, ``epoch``, ``name``, ``value``); ``[]`` when
    the run has none (methods that log no per-step scalar)."""
    if not path.is_file():
        return []
    try:
        with io.StringIO(read_text(path), newline="") as fh:
            return [
                {
                    "step": int(row["step"]),
                    "epoch": int(row["epoch"]),
                    "name": str(row["name"]),
                    "value": float(row["value"]),
                }
                for row in csv.DictReader(fh)
            ]
    except (KeyError, ValueError, TypeError, csv.Error):
        raise DataError(f"{str(path)!r} is damaged (not step, epoch, name, value rows)") from None


def run_records(label: str, seed: int, summary: Mapping[str, Any] | Any) -> list[dict[str, Any]]:
    """The records of one run from its summary (the ``metrics.json`` content, or an object
    with ``to_json()`` returning it). A summary ``{"diverged": reason}`` gives one record
    ``diverged = 1.0``, so that a failed run is counted rather than silently missing."""
    if not isinstance(summary, Mapping):
        summary = summary.to_json()
    if DIVERGED in summary:
        return [_record(label, seed, "test", DIVERGED, 1.0)]
    metrics = summary.get("metrics")
    if not isinstance(metrics, Mapping) or not all(
        isinstance(m, Mapping) for m in metrics.values()
    ):
        raise DataError(f"the summary of {label} seed {seed} holds no metrics per split")
    rows = [
        _record(label, seed, split, metric, _number(value, metric))
        for split, values in metrics.items()
        for metric, value in values.items()
    ]
    if summary.get("bayes_accuracy") is not None:
        bayes = _number(summary["bayes_accuracy"], "bayes_accuracy")
        rows.append(_record(label, seed, "test", "bayes_accuracy", bayes))
    return rows


def status_record(label: str, seed: int, status: str, message: str) -> dict[str, Any]:
    """The record of a run that did not finish: ``split`` is ``"run"``, ``metric`` is
    ``"status"``, ``value`` is ``"diverged"`` (the loss or weights became non-finite) or
    ``"failed"`` (another user-facing error), and ``message`` says why. Statistics skip it (it
    belongs to no data split); the comparison table counts it as a seed that did not finish."""
    return {
        "method": label,
        "seed": seed,
        "split": STATUS_SPLIT,
        "metric": STATUS_METRIC,
        "value": status,
        "message": message,
    }


def failed_runs(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The status records of the runs that did not finish."""
    return [r for r in records if r["split"] == STATUS_SPLIT and r["metric"] == STATUS_METRIC]


def _record(label: str, seed: int, split: str, metric: str, value: float | None) -> dict[str, Any]:
    return {"method": label, "seed": seed, "split": split, "metric": metric, "value": value}


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{what} is {value!r}, not a number")
    return float(value)


def check_records(records: Any, where: str) -> list[dict[str, Any]]:
    """``records`` if it is a list of well-formed records, else a :class:`DataError`."""
    if not isinstance(records, list):
        raise DataError(f"{where} does not hold a list of records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or any(k not in r for k in RECORD_KEYS):
            raise DataError(f"{where}: record {i} lacks one of {', '.join(RECORD_KEYS)}")
        if not all(isinstance(r[k], str) for k in ("method", "split", "metric")):
            raise DataError(f"{where}: record {i} has a method, split or metric that is not a name")
        value = r["value"]
        if r["split"] == STATUS_SPLIT:
            if not isinstance(value, str):
                raise DataError(f"{where}: status record {i} has a value that is not a status")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise DataError(f"{where}: record {i} has a value that is not a number")
        if isinstance(r["seed"], bool) or not isinstance(r["seed"], int):
            raise DataError(f"{where}: record {i} has a seed that is not an integer")
    return records


@dataclass
class Source:
    """What a report is made of: the records and the run directory of each (method, seed)."""

    root: Path
    records: list[dict[str, Any]]
    runs: dict[tuple[str, int], Path] = field(default_factory=dict)

    def analyses(self) -> dict[str, list[dict[str, Any]]]:
        """``{method: [analysis.json of each seed]}`` (methods whose runs have one)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for (method, _), run_dir in self.runs.items():
            f = run_dir / "analysis.json"
            if f.is_file():
                analysis = read_json(f)
                if not is_analysis(analysis):
                    raise DataError(f"{str(f)!r} does not hold an analysis")
                out.setdefault(method, []).append(analysis)
        return out

    def histories(self) -> dict[tuple[str, int], list[dict[str, float]]]:
        """``{(method, seed): metrics.csv rows}`` of the runs that have any."""
        out = {}
        for key, run_dir in self.runs.items():
            rows = read_history(run_dir / "metrics.csv")
            if rows:
                out[key] = rows
        return out

    def step_logs(self) -> dict[tuple[str, int], list[dict[str, Any]]]:
        """``{(method, seed): steps.csv rows}`` of the runs whose method logs per-step scalars."""
        out = {}
        for key, run_dir in self.runs.items():
            rows = read_step_logs(run_dir / "steps.csv")
            if rows:
                out[key] = rows
        return out

    def data_records(self) -> dict[tuple[str, int], dict[str, Any]]:
        """``{(method, seed): data.json}`` of the runs that have one (what each run's data was:
        split sizes, class names, fingerprint)."""
        out = {}
        for key, run_dir in self.runs.items():
            f = run_dir / "data.json"
            if f.is_file():
                record = read_json(f)
                if not isinstance(record, dict):
                    raise DataError(f"{str(f)!r} does not hold a data record")
                out[key] = record
        return out

    def configs(self) -> dict[tuple[str, int], dict[str, Any]]:
        """``{(method, seed): config.yaml}`` of the runs that have one (each section a
        mapping, else a :class:`DataError`)."""
        out = {}
        for key, run_dir in self.runs.items():
            path = run_dir / "config.yaml"
            if path.is_file():
                cfg = read_yaml(path)
                for section, value in cfg.items():
                    # two entries are not mappings: unimodal_heads (a flag) and the plugins the
                    # run was trained with (a list of records, read as text, never imported)
                    expected = {"unimodal_heads": object, "plugins": list}.get(section, dict)
                    if not isinstance(section, str) or not isinstance(value, expected):
                        raise DataError(f"{str(path)!r}: {shown(section)} is not a section")
                out[key] = cfg
        return out


def _optional_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def is_analysis(analysis: Any) -> bool:
    """Whether ``analysis`` has the form of an ``analysis.json`` (the parts a report reads)."""
    if not isinstance(analysis, dict):
        return False
    errors = analysis.get("errors")
    if errors is None:
        return True
    if not isinstance(errors, dict) or not isinstance(errors.get("groups"), dict):
        return False
    if isinstance(errors.get("n"), bool) or not isinstance(errors.get("n"), int):
        return False
    numbers = ("routing_rate", "synergy_rate", "fused_accuracy")
    if not all(_optional_number(errors.get(k)) for k in numbers):
        return False
    for name, group in errors["groups"].items():
        if not isinstance(name, str) or not isinstance(group, dict):
            return False
        if not all(_optional_number(group.get(k)) for k in ("count", "fraction", "fused_accuracy")):
            return False
    return True


def load_source(path: str | Path) -> Source:
    """Read a compare directory (``results.json``) or a single run directory (``metrics.json``)."""
    root = Path(path)
    check_path_usable(root)
    if (root / "results.json").is_file():
        where = str(root / "results.json")
        records = check_records(read_json(root / "results.json"), repr(where))
        runs: dict[tuple[str, int], Path] = {}  # in the order of the records (the comparison's)
        for r in records:
            run_dir = root / str(r["method"]) / f"seed{r['seed']}"
            if (r["method"], int(r["seed"])) not in runs and run_dir.is_dir():
                runs[(r["method"], int(r["seed"]))] = run_dir
        return Source(root, records, runs)
    if (root / "metrics.json").is_file():
        summary = read_json(root / "metrics.json")
        if not isinstance(summary, dict):
            raise DataError(f"{str(root / 'metrics.json')!r} does not hold a run summary")
        label, seed = "run", 0
        if (root / "config.yaml").is_file():
            cfg = read_yaml(root / "config.yaml")
            method, train = cfg.get("method"), cfg.get("train")
            if isinstance(method, dict) and isinstance(method.get("name"), str):
                label = method["name"]
            if isinstance(train, dict) and type(train.get("seed")) is int:
                seed = train["seed"]
        try:
            records = run_records(label, seed, summary)
        except DataError as err:
            raise DataError(f"{str(root / 'metrics.json')!r}: {err}") from None
        return Source(root, records, {(label, seed): root})
    raise DataError(
        f"{str(root)!r} is neither a compare directory (results.json) nor a run (metrics.json)"
    )


def methods_of(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The methods of the records, in first-seen order."""
    return list(dict.fromkeys(str(r["method"]) for r in records))


def modalities_of(records: Iterable[Mapping[str, Any]], prefix: str = "shapley_") -> list[str]:
    """The modalities named by ``<prefix><modality>`` metrics, in first-seen order."""
    return list(
        dict.fromkeys(
            str(r["metric"])[len(prefix) :] for r in records if str(r["metric"]).startswith(prefix)
        )
    )


def unused_modalities(records: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """``{method: modalities it does not use}``: those whose test Shapley value is exactly 0 on
    every seed (a modality that can change no prediction gets exactly 0, e.g. the other
    modality of a ``unimodal`` baseline). Decided from the data, so no method is named here;
    their probes, heads and curves measure an untrained encoder and are left out of plots."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in records:
        metric = str(r["metric"])
        if r["split"] == "test" and metric.startswith("shapley_") and r["value"] is not None:
            modality = metric[len("shapley_") :]
            values.setdefault(r["method"], {}).setdefault(modality, []).append(float(r["value"]))
    return {
        method: {m for m, v in by_mod.items() if all(x == 0.0 for x in v)}
        for method, by_mod in values.items()
    }
