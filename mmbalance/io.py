"""Crash-safe, link-safe file writing and reading, and the output directories mmbalance owns.

Writing. Every file mmbalance writes (checkpoints, JSON, CSV, YAML, figures, reports, manifests,
prepared arrays, caches) goes through one writer, :func:`_write_atomic`: it creates a temporary
file beside the target with an unpredictable name (``.NAME.<random>.tmp``) exclusively
(``O_CREAT | O_EXCL | O_NOFOLLOW``), writes and flushes it to disk, and renames it over the
target with ``os.replace``. So a run killed mid-write leaves either the old file or the new one,
never a truncated one; a symbolic link planted at the target is replaced, never written through;
and no temporary name can be guessed in advance to plant a link under it. A full disk is one line
(:class:`~mmbalance.errors.NoSpaceLeft`) and leaves the old file as it was. A kill can leave the
temporary file itself behind; :func:`remove_stale_temporaries` clears those when the directory's
owner starts again. Writers that need a stream (``torch.save``, ``numpy.save``, matplotlib's
``savefig``) write into the temporary file's handle or into memory first, never to a path.

Output directories. An output directory (``--out`` of ``train``, ``compare`` and ``prepare``)
is written only if it is new, empty, or carries mmbalance's mark (:data:`OWNER_MARK`, a small
JSON file created exclusively before anything else is written; :func:`claim_output`), so a
command never overwrites files that mmbalance did not write. While a command writes into one, it
holds an exclusive lock on that mark (:func:`output_lock`), so a second process is refused in one
line instead of interleaving its files (and deleting the other's temporaries).

Reading. Files given by the user are opened only if they are regular files (a FIFO or a device
would hang or never end: :func:`open_regular`); JSON files go through :func:`read_json`, which
reports a missing, damaged or oversized file in one line (:class:`~mmbalance.errors.DataError`),
and zip archives (``torch.save`` files) can be checked against a size budget before anything is
decompressed (:func:`check_zip_archive`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from mmbalance.errors import ConfigError, DataError, NoSpaceLeft, shown

__all__ = [
    "OWNER_MARK",
    "check_path_usable",
    "check_zip_archive",
    "claim_output",
    "is_written_file",
    "make_dir",
    "open_regular",
    "output_lock",
    "output_owner",
    "read_json",
    "read_text",
    "remove_stale_temporaries",
    "save_atomic",
    "write_binary_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

#: The file that marks a directory as an output mmbalance owns (see :func:`claim_output`).
OWNER_MARK = ".mmbalance"
#: Errors that mean the device is full (or the user's quota or file-size limit is reached).
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# --- writing ---------------------------------------------------------------------------------
def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.NAME.XXXXXXXXXXXXXXXX.tmp`` beside ``path``, created exclusively (never
    through a link) with the permissions of any new file (mode 0o666 under the umask, unlike
    ``mkstemp``'s 0o600, so a shared run directory stays readable)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _full_disk(path: Path) -> NoSpaceLeft:
    return NoSpaceLeft(
        f"no space left on the device to write {str(path)!r}; the previous file, if any, is "
        "kept as it was; free some space and run the command again"
    )


def _write_atomic(path: Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    """The one writer of every file mmbalance writes (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in _FULL:
            raise _full_disk(path) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_binary_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a binary file that becomes ``path`` atomically (``numpy.save``)."""
    _write_atomic(Path(path), "wb", write)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either the old or the new file."""
    _write_atomic(Path(path), "wb", lambda f: f.write(data))


class _WriteRecorder:
    """A file that remembers the ``OSError`` its writes raised (torch's zip writer reports
    one as a ``RuntimeError`` without its errno)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old or the new file."""
    import torch  # here, so that the command line's start-up does not import torch

    def write(f: BinaryIO) -> None:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)  # type: ignore[arg-type]
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise

    _write_atomic(Path(path), "wb", write)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that ``path`` is either the old or the new file."""
    _write_atomic(Path(path), "w", lambda f: f.write(text))


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically. It is serialised before anything is written, so an
    unserialisable value leaves the old file untouched."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def make_dir(path: Path) -> Path:
    """Create a directory that mmbalance writes into, inside an output it owns (``tb/``,
    ``pretrain/``, a prepared dataset's ``frames/``): a symbolic link planted there is replaced
    by a real directory, never followed; any other file there is a one-line error."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{str(path)!r} is a file where mmbalance writes a directory") from None
    if path.is_symlink() or not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a directory mmbalance can write into")
    return path


def is_written_file(path: Path) -> bool:
    """Whether ``path`` is a regular file itself, not a link: what a writer of mmbalance left
    there. A link planted in an output directory under one of its names is not a file of the
    output: it is neither read as one nor taken as a sign of earlier work, and writing the
    name replaces it."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``) that a killed writer of ``names`` left in
    ``directory``; returns what was removed. Call it only from the directory's single writer
    (the holder of its :func:`output_lock`), before it writes."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for name in names:
        for tmp in directory.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# --- output directories --------------------------------------------------------------------------
def _checked_path(path: str | Path, what: str) -> Path:
    text = str(path)
    if not text.strip():
        raise ConfigError(f"{what} is empty; name the directory to write into")
    if "\0" in text:
        raise ConfigError(f"{what} holds a NUL character, which no path may hold")
    return Path(path)


def output_owner(path: Path) -> dict[str, Any] | None:
    """The content of ``path``'s mark (``{"written_by": "mmbalance", "kind": ..., "version":
    ...}``), or None when it has no readable mark of ours (a link is never one)."""
    mark = Path(path) / OWNER_MARK
    try:
        with open_regular(mark, follow=False) as f:
            content = json.loads(f.read(4096).decode("utf-8"))
    except (OSError, ValueError, DataError):
        return None
    if not isinstance(content, dict) or content.get("written_by") != "mmbalance":
        return None
    return content


def _write_mark(path: Path, kind: str) -> None:
    """Create the mark exclusively: written under a temporary name, then hard-linked to its name
    (``link`` fails if the name exists, link or not), so two processes never both create it."""
    import mmbalance

    content = json.dumps(
        {"written_by": "mmbalance", "kind": kind, "version": mmbalance.__version__}
    )
    fd, tmp = _create_temporary(path / OWNER_MARK)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content + "\n")
        os.link(tmp, path / OWNER_MARK)
    except FileExistsError:
        pass  # another process marked it first
    finally:
        tmp.unlink(missing_ok=True)


def claim_output(path: str | Path, kind: str, what: str = "--out") -> Path:
    """Make ``path`` an output directory of ``kind`` (``run``, ``comparison``, ``prepared``)
    that this command may write, or raise a one-line :class:`~mmbalance.errors.ConfigError`.

    A new or empty directory is created and marked (:data:`OWNER_MARK`) before anything else is
    written; a directory already marked as an output of the same kind is accepted; anything else
    (a directory holding files mmbalance did not write, another kind of output, a file) is
    refused, so that no user file is ever overwritten."""
    path = _checked_path(path, what)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what} {str(path)!r} is a file, not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise ConfigError(f"{what} {str(path)!r} cannot be created ({reason})") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {str(path)!r} is not writable")
        owner = output_owner(path)
        if owner is None:
            entries = sorted(p.name for p in path.iterdir())
            if entries:
                raise ConfigError(
                    f"{what} {str(path)!r} holds files mmbalance did not write ({len(entries)} "
                    f"entries, e.g. {entries[0]!r}); choose a new or empty directory"
                )
            _write_mark(path, kind)
            owner = output_owner(path)
            if owner is None:
                raise ConfigError(f"{what} {str(path)!r} could not be marked as mmbalance's")
        if owner.get("kind") != kind:
            raise ConfigError(
                f"{what} {str(path)!r} is a {owner.get('kind')!s:.40} directory of mmbalance, "
                f"not a {kind} directory; choose another directory"
            )
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"{what} {str(path)!r} cannot be used ({reason})") from None
    return path


#: The output locks this process holds: (device, inode) of the mark -> how many times.
_HELD: dict[tuple[int, int], int] = {}


@contextlib.contextmanager
def output_lock(path: Path, what: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on the output directory ``path`` (on its mark, which
    :func:`claim_output` created) while writing it; another process is refused in one line
    (this process may take it again, e.g. a comparison writing its report). The operating
    system releases the lock when the process dies, so a killed command leaves nothing to
    clean up."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    mark = Path(path) / OWNER_MARK
    try:
        fd = os.open(mark, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise ConfigError(f"{what} {str(path)!r} has no usable mark ({err.strerror})") from None
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    try:
        if key not in _HELD:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ConfigError(
                    f"another mmbalance process is writing {str(path)!r}; wait for it to "
                    f"finish or choose another {what}"
                ) from None
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
    finally:
        os.close(fd)  # releases the lock if this descriptor took it


# --- reading ---------------------------------------------------------------------------------
def check_path_usable(path: Path) -> None:
    """A one-line :class:`~mmbalance.errors.DataError` if ``path`` cannot even be looked up (a
    name too long, a NUL character); a path that does not exist yet passes."""
    try:
        Path(path).stat()
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise DataError(f"{shown(str(path), 100)} cannot be read ({reason})") from None


def open_regular(path: Path, follow: bool = True) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file, else a one-line
    :class:`~mmbalance.errors.DataError` (a FIFO, socket or device would hang or never end; it
    is opened without blocking, checked, and never read). ``follow=False`` refuses links."""
    flags = os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC | (0 if follow else _NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError(f"{str(path)!r} does not exist") from None
    except OSError as err:
        raise DataError(f"{str(path)!r} is unreadable ({err.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{str(path)!r} is not a regular file; mmbalance reads only files")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_text(path: Path, limit: int = 64 << 20, what: str = "", errors: str = "strict") -> str:
    """The UTF-8 text of the regular file ``path`` (at most ``limit`` bytes), or a one-line
    :class:`~mmbalance.errors.DataError` naming it (``errors="replace"``: undecodable bytes
    are replaced instead)."""
    name = what or repr(str(path))
    with open_regular(Path(path)) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(
            f"{name} is larger than {limit >> 20} MiB; it is not a file mmbalance wrote"
        )
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError:
        raise DataError(f"{name} is not a UTF-8 text file") from None


def read_json(path: Path) -> Any:
    """The content of a JSON file we wrote, or a one-line :class:`DataError` naming the file if
    it is missing, unreadable, damaged (truncated, edited, not UTF-8), not a regular file,
    oversized or nested deeper than any file we write."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist")
    try:
        text = read_text(path)
    except DataError as err:
        if "UTF-8" in str(err):
            raise DataError(f"{str(path)!r} is unreadable (UnicodeDecodeError)") from None
        raise
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{str(path)!r} is damaged (invalid JSON at line {err.lineno}, column {err.colno}); "
            "delete it to redo what wrote it"
        ) from None
    except RecursionError:
        raise DataError(f"{str(path)!r} is damaged (nested too deeply)") from None


def check_zip_archive(path: Path, max_bytes: int, what: str = "checkpoint") -> None:
    """Refuse, in one line, a ``torch.save`` archive whose entries are compressed or whose
    declared sizes add up to more than ``max_bytes``, before anything is decompressed or read
    (a small compressed file could otherwise claim gigabytes of memory). torch writes every
    entry stored, uncompressed, so the declared sizes are the file's own."""
    name = f"{what} {str(path)!r}"
    try:
        with open_regular(Path(path)) as f, zipfile.ZipFile(f) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile:
        raise DataError(f"{name} is not a checkpoint archive (it may be truncated)") from None
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{name} is unreadable ({type(err).__name__})") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise DataError(
            f"{name} holds compressed entries, which mmbalance never writes; not loaded"
        )
    declared = sum(e.file_size for e in entries)
    if declared > max_bytes:
        raise DataError(
            f"{name} declares {declared / 2**20:.0f} MiB, more than this configuration can need "
            f"({max_bytes / 2**20:.0f} MiB); not loaded"
        )
