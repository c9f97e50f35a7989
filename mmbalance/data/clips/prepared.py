"""A prepared directory's files: the per-clip ``.npy`` arrays (written atomically, so an
interrupted ``prepare`` resumes), ``manifest.csv`` (``clip,label,split``), ``classes.txt`` and
``prepare_options.json``, the checks that keep every path inside its directory (a clip name from
a release's list or a manifest must be a plain file name, and a prepared file must resolve inside
the prepared directory; a symlinked directory as a whole is fine), and the fingerprint of its
files (:func:`files_stamp`)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmbalance.errors import DataError, shown
from mmbalance.io import (
    is_written_file,
    open_regular,
    read_json,
    read_text,
    write_binary_atomic,
    write_json_atomic,
    write_text_atomic,
)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write through :mod:`mmbalance.io`'s atomic writer: a crash never leaves a half-written
    file, and a link planted at ``path`` is replaced, never written through."""
    write_binary_atomic(path, lambda f: np.save(f, array))


def load_npy(path: Path, dataset: str) -> np.ndarray:
    """A prepared array of numbers, memory-mapped, or a one-line :class:`DataError` saying how
    to fix it: a missing file, one that is not a regular file (a FIFO would hang the read), not
    a ``.npy`` array (an ``.npz`` archive under that name, a pickle) or not numbers (text)."""
    redo = f"delete it and re-run `mmbalance prepare {dataset}` on this directory"
    try:
        open_regular(path).close()  # opened without blocking and checked, never read
    except DataError as err:
        if "does not exist" in str(err):
            raise DataError(
                f"{path} is missing; re-run `mmbalance prepare {dataset}` on this directory"
            ) from None
        raise DataError(f"{err}; {redo}") from None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__}); {redo}") from None
    if not isinstance(array, np.ndarray):
        close = getattr(array, "close", None)
        if close is not None:
            close()
        raise DataError(f"{path} is not a .npy array (an .npz archive?); {redo}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path} holds {array.dtype} values, not numbers; {redo}")
    return array


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


#: Where a prepared directory records what it was prepared from and with.
PREPARE_OPTIONS_FILE = "prepare_options.json"


def record_prepare_options(out: Path, dataset: str, options: Mapping[str, Any]) -> None:
    """Record the dataset and the options (all but ``workers``) ``out`` is prepared with, before
    anything is prepared; a directory prepared with others is refused in one line (a rerun
    prepares only missing clips, so other options would mix two preparations)."""
    path = out / PREPARE_OPTIONS_FILE
    wanted = {"dataset": dataset, "options": dict(options)}
    if is_written_file(path):
        saved = read_json(path)
        if saved != wanted:
            before = saved.get("options", {}) if isinstance(saved, dict) else {}
            before = before if isinstance(before, dict) else {}
            if not isinstance(saved, dict) or saved.get("dataset") != dataset:
                what = (
                    f"dataset {str(saved.get('dataset') if isinstance(saved, dict) else '?')!r:.40}"
                )
            else:
                keys = sorted(
                    k for k in options.keys() | before.keys() if before.get(k) != options.get(k)
                )
                what = ", ".join(
                    f"--{k.replace('_', '-')} {shown(before.get(k), 20)} (now {shown(options.get(k), 20)})"
                    for k in keys
                )
            raise DataError(
                f"{str(out)!r} was prepared with {what}; prepare into another --out, or delete "
                "it to prepare it again"
            )
        return
    write_json_atomic(path, wanted)


def write_manifest(out: Path, rows: Iterable[dict[str, str]]) -> None:
    """``manifest.csv`` with columns ``clip,label,split``, written atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["clip", "label", "split"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "manifest.csv", text.getvalue())


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
        text = read_text(path, what=str(path))
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise DataError(f"{path} is unreadable ({err}); {hint}") from None
    except DataError as err:
        raise DataError(f"{err}; {hint}") from None
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
    try:
        classes = [c for c in read_text(path, what=str(path)).splitlines() if c]
    except DataError as err:
        raise DataError(f"{err}; {hint}") from None
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise DataError(f"{root / 'manifest.csv'} has labels {unknown} not in classes.txt; {hint}")
    return classes


def files_stamp(root: Path) -> str:
    """A cheap fingerprint of every file in the prepared directory ``root``: the name, type,
    size, modification and change times and inode of each (links inside are followed; hidden
    temporaries are left out). Any change to a file (rewritten, touched, replaced, a FIFO put in
    its place) changes it, so a cache keyed on it is never stale."""
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            h.update(
                f"{rel}|{st.st_mode}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}\n".encode(
                    errors="surrogateescape"
                )
            )
    return h.hexdigest()
