"""A prepared directory's files: the per-clip ``.npy`` arrays (written under a temporary name,
then renamed, so an interrupted ``prepare`` resumes), ``manifest.csv`` (``clip,label,split``) and
``classes.txt``, and the checks that keep every path inside its directory: a clip name from a
release's list or a manifest must be a plain file name, and a prepared file must resolve inside
the prepared directory (a symlinked directory as a whole is fine)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mmbalance.errors import DataError


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write under a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_npy(path: Path, dataset: str) -> np.ndarray:
    """A prepared array, memory-mapped, or a one-line :class:`DataError` saying how to fix it."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing; re-run `mmbalance prepare {dataset}` on this directory"
        ) from None
    except Exception as err:
        raise DataError(
            f"{path} is unreadable ({type(err).__name__}); delete it and re-run "
            f"`mmbalance prepare {dataset}` on this directory"
        ) from err


def check_clip_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name, else a one-line :class:`DataError` naming ``where``.

    Clip names become file names (``<out>/frames/<clip>.npy``, ``<raw>/rgb/<clip>/``), so a name
    with a path separator, ``..`` or an absolute path would lead outside the directory: a list
    or manifest from elsewhere could make ``prepare`` write, or a run read, any file. Control
    characters are refused too (they have no place in a file name and would split messages).
    """
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(c) < 32 for c in name)
        or Path(name).is_absolute()
    ):
        raise DataError(
            f"{where}: clip name {name!r} is not a plain file name (it would lead outside the "
            "dataset's directory); fix or remove that entry"
        )
    return name


def inside(root: Path, path: Path, hint: str) -> Path:
    """``path`` if it resolves inside the resolved directory ``root`` (symlinks followed)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise DataError(
            f"{path} resolves to {resolved}, outside the prepared directory {root}; a prepared "
            f"directory must hold its own files (a symlink to the whole directory is fine); {hint}"
        )
    return path


def write_manifest(out: Path, rows: Iterable[dict[str, str]]) -> None:
    """``manifest.csv`` with columns ``clip,label,split``, written atomically."""
    tmp = out / f".manifest.csv.{os.getpid()}.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["clip", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "manifest.csv")


def read_manifest(
    root: Path, title: str, hint: str, labels: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """The prepared directory's manifest rows, or a :class:`DataError` saying how to make it."""
    if not root.is_dir():
        raise DataError(f"{title} directory {root} does not exist; {hint}")
    path = root / "manifest.csv"
    if not path.exists():
        raise DataError(f"{path} is missing (not a prepared directory); {hint}")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path} is unreadable ({err}); {hint}") from err
    if not rows:
        raise DataError(f"{path} lists no clips; {hint}")
    if not {"clip", "label", "split"} <= set(rows[0]):
        raise DataError(f"{path} lacks the columns clip,label,split; {hint}")
    for n, row in enumerate(rows, 2):
        if None in row.values() or None in row:
            raise DataError(f"{path}:{n} does not have exactly the columns clip,label,split")
        check_clip_name(row["clip"], f"{path}:{n}")
    if labels is not None:
        known = set(labels)
        for row in rows:
            if row["label"] not in known:
                raise DataError(f"{path}: clip {row['clip']} has unknown label {row['label']!r}")
    return rows


def read_classes(root: Path, rows: Sequence[dict[str, str]], hint: str) -> list[str]:
    """The class names of a prepared directory (``classes.txt``, label order), checked."""
    path = root / "classes.txt"
    if not path.exists():
        raise DataError(f"{path} is missing (not a prepared directory); {hint}")
    classes = [c for c in path.read_text().splitlines() if c]
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise DataError(f"{root / 'manifest.csv'} has labels {unknown} not in classes.txt; {hint}")
    return classes
