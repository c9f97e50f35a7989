"""Run directories: where a run may be written, and whether a command may continue one.

A run directory belongs to one configuration, written to its ``config.yaml`` before the first
epoch, and to mmbalance: it is new, empty or marked as a run directory of mmbalance
(:func:`mmbalance.io.claim_output`), so a run never overwrites a file it did not write. Nothing
may mix two configurations in one directory:

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

import hashlib
import json
import platform
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mmbalance.builder.assemble import data_fingerprint
from mmbalance.builder.resolve import ResolvedConfig, config_differences, resolve_config
from mmbalance.config import PRESENTATION_KEYS, load_yaml
from mmbalance.errors import ConfigError, DataError, shown
from mmbalance.io import (
    claim_output,
    is_written_file,
    output_owner,
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


def saved_overrides(run_dir: Path) -> dict[str, Any] | None:
    """The flat keys of a run directory's ``config.yaml``, or None if it has none."""
    path = Path(run_dir) / "config.yaml"
    if not is_written_file(path):
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
    """Whether ``run_dir`` holds a checkpoint (here or in its ``pretrain/`` stage) or a
    ``metrics.json``."""
    run_dir = Path(run_dir)
    try:
        return is_written_file(run_dir / "metrics.json") or any(
            map(is_written_file, run_dir.rglob("*.ckpt"))
        )
    except (OSError, ValueError) as err:  # a name too long, a loop of links, a NUL character
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"--out {shown(str(run_dir), 100)} cannot be used ({reason})") from None


def check_foreign_files(run_dir: Path) -> None:
    """Refuse ``run_dir`` in one line if it holds files but is not a run directory of
    mmbalance's (see :func:`mmbalance.io.claim_output`); writes nothing."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise ConfigError(f"{str(run_dir)!r} is a symbolic link, not a run directory")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    owner = output_owner(run_dir)
    if owner is None or owner.get("kind") != "run":
        raise ConfigError(
            f"{str(run_dir)!r} holds files mmbalance did not write as a run; move them away or "
            "choose another --out"
        )


def check_run_dir(cfg: ResolvedConfig, run_dir: Path, resume: bool) -> None:
    """Refuse to train ``cfg`` into ``run_dir`` if that would mix configurations or overwrite
    files mmbalance did not write (see the module docstring); creates and marks the directory
    (:func:`mmbalance.io.claim_output`). Writes nothing else."""
    run_dir = Path(run_dir)
    trained = holds_trained_state(run_dir)
    if not resume and trained:
        raise ConfigError(
            f"{str(run_dir)!r} already holds a run; resume it with --resume or choose another --out"
        )
    claim_output(run_dir, "run")
    if not resume:
        return
    last = run_dir / "last.ckpt"
    old = saved_config(run_dir)
    if is_written_file(last):
        # what the checkpoint was trained with decides, not a file that may have been edited
        trained_with = checkpoint_config(last, notice=True)
        if old is not None:
            edited = [k for k in config_differences(trained_with, old) if k not in RESUME_ALLOWED]
            if edited:
                raise ConfigError(
                    f"{str(run_dir / 'config.yaml')!r} differs from the configuration "
                    f"{str(last)!r} was trained with (keys: {', '.join(edited)}); restore it: "
                    "--resume continues the trained configuration"
                )
        old = trained_with
    if old is None:
        if trained:
            raise ConfigError(
                f"{str(run_dir)!r} holds checkpoints but no config.yaml, so it cannot be resumed"
            )
        return
    check_resumable(old, cfg.identity(), run_dir)


def checkpoint_config(path: Path, notice: bool = False) -> dict[str, Any]:
    """The configuration (:meth:`~mmbalance.builder.ResolvedConfig.identity`) that the checkpoint
    ``path`` was trained with, as it records it; a checkpoint that records none is a one-line
    error. ``notice``: say in one line when another version of mmbalance wrote it."""
    import mmbalance
    from mmbalance.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, mmap=True)
    text, version = ckpt.get("config"), ckpt.get("version")
    if not isinstance(text, str):
        raise ConfigError(
            f"checkpoint {str(path)!r} records no configuration (an older mmbalance wrote it), "
            "so what it resumes cannot be verified; train it again"
        )
    try:
        config = json.loads(text)
        # what it records must be a configuration, exactly as this version writes it
        rebuilt = resolve_config(config).identity() if isinstance(config, dict) else None
    except (ValueError, RecursionError, ConfigError):
        rebuilt = None
    if rebuilt is None or rebuilt != config:
        raise DataError(f"checkpoint {str(path)!r} records a damaged configuration")
    if notice and version != mmbalance.__version__:
        print(
            f"mmbalance: note: {str(path)!r} was written by mmbalance {shown(version, 20)}; "
            f"resuming it with mmbalance {mmbalance.__version__}",
            file=sys.stderr,
        )
    return config


def check_resumable(old: Mapping[str, Any], new: Mapping[str, Any], run_dir: Path) -> None:
    """Refuse to resume the run trained with configuration ``old`` as ``new`` unless they differ
    only in :data:`RESUME_ALLOWED` (and ``train.epochs`` upwards, without a schedule that
    depends on it)."""
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


def config_hash(cfg: ResolvedConfig) -> str:
    """A hash of what defines ``cfg``'s run: its
    :meth:`~mmbalance.builder.ResolvedConfig.identity` without the
    :data:`~mmbalance.config.PRESENTATION_KEYS`."""
    flat = {k: v for k, v in cfg.identity().items() if k not in PRESENTATION_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def check_same_run(cfg: ResolvedConfig, run_dir: Path) -> None:
    """Refuse to reuse or continue ``run_dir`` for ``cfg`` unless it holds the same run: its
    saved configuration equal up to :data:`~mmbalance.config.PRESENTATION_KEYS`, and what it
    was trained with (as its ``metrics.json`` or ``last.ckpt`` records it) this configuration
    on the data ``cfg``'s dataset holds now (:func:`~mmbalance.builder.data_fingerprint`), so
    that a comparison never mixes runs of other data or of an edited ``config.yaml``."""
    check_foreign_files(run_dir)
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
    check_trained_on(cfg, run_dir)


def check_trained_on(cfg: ResolvedConfig, run_dir: Path) -> None:
    """Refuse ``run_dir`` unless what its ``metrics.json`` (a finished run) or ``last.ckpt``
    (an interrupted one) records it was trained with is ``cfg`` on the data its dataset holds
    now; a directory with neither passes."""
    metrics, last = Path(run_dir) / "metrics.json", Path(run_dir) / "last.ckpt"
    if is_written_file(metrics):
        summary = read_json(metrics)
        summary = summary if isinstance(summary, dict) else {}
        data, same_config = summary.get("data"), summary.get("config") == config_hash(cfg)
        where = metrics
    elif is_written_file(last):
        from mmbalance.train.checkpoint import load_checkpoint

        data = load_checkpoint(last, mmap=True).get("data")
        trained_with = checkpoint_config(last)
        same_config = not [
            k for k in config_differences(trained_with, cfg.identity()) if k not in RESUME_ALLOWED
        ]
        where = last
    else:
        return
    if not isinstance(data, str):
        raise ConfigError(
            f"{str(where)!r} records no fingerprint of the data it was trained on (an older "
            "mmbalance wrote it), so it cannot be reused; delete that run or choose another --out"
        )
    if not same_config:
        raise ConfigError(
            f"{str(where)!r} was trained with another configuration than "
            f"{str(Path(run_dir) / 'config.yaml')!r} says (was it edited?); delete that run or "
            "choose another --out"
        )
    if data != data_fingerprint(cfg):
        raise ConfigError(
            f"{str(run_dir)!r} holds a run trained on other data than dataset "
            f"{cfg.dataset.name!r} holds now (its files changed since); delete that run or "
            "choose another --out"
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
    claim_output(run_dir, "run")  # (done already when fit checked the directory)
    remove_stale_temporaries(run_dir, RUN_FILES)
    full = cfg.to_dict()
    if records():  # which plugins the run had: `mmbalance train config.yaml` loads them again
        full["plugins"] = records()
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(full, sort_keys=False))
    path = run_dir / "provenance.json"
    saved = read_json(path) if resume and is_written_file(path) else {}
    history = saved.get("invocations") if isinstance(saved, dict) else None
    history = history if isinstance(history, list) else []
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
