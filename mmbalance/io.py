"""Crash-safe file writing and reading shared by runs, comparisons and dataset caches.

Every file mmbalance writes goes to a temporary file in the same directory, is flushed to disk
and renamed over its destination (``os.replace`` is atomic on POSIX), so a run killed mid-write
leaves either the old file or the new one, never a truncated one. A kill can still leave the
temporary file itself behind (``.NAME.XXXX.tmp``); :func:`remove_stale_temporaries` clears those
when the directory's owner starts again. Readers of our JSON files go through :func:`read_json`,
which reports a damaged file in one line (:class:`~mmbalance.errors.DataError`).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from mmbalance.errors import DataError

__all__ = [
    "read_json",
    "remove_stale_temporaries",
    "save_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.NAME.XXXXXXXX.tmp`` beside ``path``, created with the permissions of any
    new file (mode 0o666 under the umask, unlike ``mkstemp``'s 0o600, so a shared run
    directory stays readable as it was before files were written atomically)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _write_atomic(path: Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old or the new file."""
    import torch  # here, so that the command line's start-up does not import torch

    _write_atomic(Path(path), "wb", lambda f: torch.save(obj, f))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either the old or the new file."""
    _write_atomic(Path(path), "wb", lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that ``path`` is either the old or the new file."""
    _write_atomic(Path(path), "w", lambda f: f.write(text))


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically. It is serialised before anything is written, so an
    unserialisable value leaves the old file untouched."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: Path) -> Any:
    """The content of a JSON file we wrote, or a one-line :class:`DataError` naming the file if
    it is missing, unreadable or damaged (truncated, edited, not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{str(path)!r} is damaged (invalid JSON at line {err.lineno}, column {err.colno}); "
            "delete it to redo what wrote it"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{str(path)!r} is unreadable ({type(err).__name__})") from None


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) that a killed writer of ``names`` left in
    ``directory``; returns what was removed. Call it only from the directory's single writer,
    before it writes: a temporary of a live writer would be removed too."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for name in names:
        for tmp in directory.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
