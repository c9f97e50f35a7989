"""Run directories: where a run may be written, and whether a command may continue one.

A run directory belongs to one configuration, written to its ``config.yaml`` before the first
epoch. Nothing may mix two configurations in one directory:

- a fresh run (no ``--resume``) refuses a directory that already holds trained state (a
  checkpoint, here or in its ``pretrain/`` stage, or a ``metrics.json``);
- ``--resume`` continues the saved configuration. A new command may change only what cannot
  alter what was already trained (:data:`RESUME_ALLOWED`): the settings of
  :data:`~mmbalance.config.PRESENTATION_KEYS` and a larger ``train.epochs`` (unless a schedule that
  depends on the total, such as cosine, is used). Any other difference is a one-line error naming
  the keys, raised before anything (``config.yaml`` included) is written;
- ``compare`` reuses a run only if its configuration is the same up to the presentation keys
  (:func:`check_same_run`).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mmbalance.builder.resolve import ResolvedConfig, config_differences, resolve_config
from mmbalance.config import PRESENTATION_KEYS, load_yaml
from mmbalance.errors import ConfigError
from mmbalance.io import (
    read_json,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
)
from mmbalance.optim import SCHEDULES
from mmbalance.plugins import expect_recorded, records, split_plugins

#: Keys a ``--resume`` may change: presentation settings, and ``train.epochs`` upwards.
RESUME_ALLOWED = (*PRESENTATION_KEYS, "train.epochs")

#: The files a run writes (their stale temporaries are removed when it starts).
RUN_FILES = (
    "config.yaml",
    "last.ckpt",
    "best.ckpt",
    "metrics.json",
    "analysis.json",
    "metrics.csv",
    "steps.csv",
    "diverged.json",
    "provenance.json",
    "data.json",
)


def check_writable_dir(path: Path, what: str = "--out") -> None:
    """Create ``path`` (a directory) or raise a one-line ConfigError saying why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"{what} {str(path)!r} cannot be created ({reason})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r} is not writable")


def saved_overrides(run_dir: Path) -> dict[str, Any] | None:
    """The flat keys of a run directory's ``config.yaml``, or None if it has none."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    # the plugins a run directory names are never imported from here: only hints that say
    # how to pass them if the command needs one of their components
    recorded, flat = split_plugins(load_yaml(path))
    expect_recorded(recorded, repr(str(path)))
    return flat


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The :meth:`~mmbalance.builder.ResolvedConfig.identity` of a run directory's
    ``config.yaml``, or None if it has none; a file that no longer resolves is a one-line
    error."""
    saved = saved_overrides(run_dir)
    if saved is None:
        return None
    try:
        return resolve_config(saved).identity()
    except ConfigError as err:
        raise ConfigError(
            f"{str(Path(run_dir) / 'config.yaml')!r} is not a usable configuration ({err})"
        ) from None


def holds_trained_state(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "metrics.json").is_file() or any(run_dir.rglob("*.ckpt"))


def check_run_dir(cfg: ResolvedConfig, run_dir: Path, resume: bool) -> None:
    """Refuse to train ``cfg`` into ``run_dir`` if that would mix configurations (see the module
    docstring); creates the directory. Writes nothing else."""
    run_dir = Path(run_dir)
    check_writable_dir(run_dir)
    trained = holds_trained_state(run_dir)
    if not resume:
        if trained:
            raise ConfigError(
                f"{str(run_dir)!r} already holds a run; resume it with --resume or choose "
                "another --out"
            )
        return
    old = saved_config(run_dir)
    if old is None:
        if trained:
            raise ConfigError(
                f"{str(run_dir)!r} holds checkpoints but no config.yaml, so it cannot be resumed"
            )
        return
    new = cfg.identity()
    differing = config_differences(old, new)
    refused = [k for k in differing if k not in RESUME_ALLOWED]
    if refused:
        raise ConfigError(
            f"{str(run_dir)!r} holds a run with another configuration (differing keys: "
            f"{', '.join(refused)}); --resume continues the saved one and accepts changes only "
            f"to {', '.join(RESUME_ALLOWED)}"
        )
    if "train.epochs" in differing:
        if new["train.epochs"] < old["train.epochs"]:
            raise ConfigError(
                f"train.epochs={new['train.epochs']} is below the {old['train.epochs']} epochs "
                "of the run being resumed; --resume can only add epochs"
            )
        if SCHEDULES.get(old["train.scheduler"]).needs_total:
            raise ConfigError(
                f"the run being resumed uses train.scheduler={old['train.scheduler']}, whose "
                "schedule depends on train.epochs; it cannot be extended on resume"
            )


def check_same_run(cfg: ResolvedConfig, run_dir: Path) -> None:
    """Refuse to reuse or continue ``run_dir`` for ``cfg`` unless its saved configuration is the
    same run (equal up to :data:`~mmbalance.config.PRESENTATION_KEYS`)."""
    saved = saved_config(run_dir)
    if saved is None:
        if holds_trained_state(run_dir):
            raise ConfigError(f"{str(run_dir)!r} holds checkpoints but no config.yaml")
        return
    differing = config_differences(saved, cfg.identity())
    differing = [k for k in differing if k not in PRESENTATION_KEYS]
    if differing:
        raise ConfigError(
            f"{str(run_dir)!r} holds a run with another configuration (differing keys: "
            f"{', '.join(differing)}); choose another --out or delete that run"
        )


def resume_overrides(run_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``--resume`` command trains: the saved configuration of ``run_dir`` with the
    command's own ``overrides`` on top (checked by :func:`check_run_dir` when it trains)."""
    saved = saved_overrides(run_dir) or {}
    # a component renamed by the command drops the saved options of the old one, as a new
    # ``method=`` does in any configuration (the check then names the differing keys)
    for key, value in overrides.items():
        if "." not in key.removeprefix("encoder.") and key in saved and saved[key] != value:
            saved = {k: v for k, v in saved.items() if not k.startswith(f"{key}.")}
    return {**saved, **overrides}


def write_run_config(cfg: ResolvedConfig, run_dir: Path, resume: bool = False) -> None:
    """Start writing ``run_dir`` (from its single writer, rank 0): remove the temporaries a
    killed writer left there, write ``config.yaml`` (every option written out, see
    :meth:`~mmbalance.builder.ResolvedConfig.to_dict`) and add this invocation to
    ``provenance.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir, RUN_FILES)
    full = cfg.to_dict()
    if records():  # which plugins the run had: `mmbalance train config.yaml` loads them again
        full["plugins"] = records()
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(full, sort_keys=False))
    path = run_dir / "provenance.json"
    history = read_json(path).get("invocations", []) if resume and path.is_file() else []
    write_json_atomic(path, {"invocations": [*history, provenance(resume)]})


def write_data_record(record: Mapping[str, Any], run_dir: Path) -> None:
    """Write ``data.json``: what the run's data was (:meth:`DatasetBundle.record`: the dataset,
    its split sizes, class names, and what its source records, such as a content fingerprint,
    a label mapping or a split's hash)."""
    write_json_atomic(Path(run_dir) / "data.json", dict(record))


def provenance(resume: bool) -> dict[str, Any]:
    """What ran this invocation: library versions, Python, platform, the command line, when,
    and the plugins loaded (module, file, SHA-256 of the source, what each provides)."""
    import lightning
    import numpy
    import torch

    import mmbalance

    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed": resume,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],
        "mmbalance": mmbalance.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "plugins": records(),
    }
