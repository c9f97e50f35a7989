"""On-disk cache of built dataset arrays, keyed by the recipe and verified by a content hash.

A generated dataset is a pure function of its recipe (source version plus parameters), so the
file name carries a hash of the recipe: changing any parameter builds a new file and never reads
a stale one. The file stores a SHA-256 of every array's bytes; a file that fails to load or whose
content no longer matches (a truncated write from another tool, a bit flip) is rebuilt. Writes go
to a temporary file that is renamed into place, so a crash never leaves a half-written cache.
Arrays are loaded memory-mapped, so a large cached dataset costs page cache rather than a copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmbalance.io import check_zip_archive, is_written_file, save_atomic

log = logging.getLogger(__name__)


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-serialisable recipe (key order does not matter)."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def content_hash(arrays: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the arrays, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        t = arrays[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_path(cache_dir: Path, name: str, recipe: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / f"{name}-{recipe_hash(recipe)[:16]}.pt"


def _load(path: Path, recipe: Mapping[str, Any]) -> tuple[dict[str, Tensor], str] | None:
    """The cached arrays and their content hash, or None (with a logged reason) if missing,
    unreadable or mismatched."""
    if not is_written_file(path):  # a link or a FIFO planted in the cache is never read
        return None
    try:
        # stored entries only, no larger than the file: nothing is inflated in memory
        check_zip_archive(path, path.stat().st_size, "cache file")
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        arrays = blob["arrays"]
        stored_recipe = json.loads(blob["recipe"])
        stored_hash = blob["content_hash"]
    except Exception as err:  # any unreadable file is simply rebuilt
        log.warning("cache file %s is unreadable (%s); rebuilding it", path, err)
        return None
    if stored_recipe != json.loads(json.dumps(recipe, sort_keys=True, default=str)):
        log.warning("cache file %s holds another recipe; rebuilding it", path)
        return None
    if content_hash(arrays) != stored_hash:
        log.warning("cache file %s failed its content hash; rebuilding it", path)
        return None
    return dict(arrays), stored_hash


def save_arrays(path: Path, recipe: Mapping[str, Any], arrays: Mapping[str, Tensor]) -> str:
    """Write arrays with their recipe and content hash atomically (see :func:`mmbalance.io.save_atomic`)."""
    blob = {
        "recipe": json.dumps(recipe, sort_keys=True, default=str),
        "content_hash": content_hash(arrays),
        "arrays": {k: v.contiguous() for k, v in arrays.items()},
    }
    save_atomic(blob, path)
    return blob["content_hash"]


def cached_arrays_and_hash(
    cache_dir: Path,
    name: str,
    recipe: Mapping[str, Any],
    build: Callable[[], dict[str, Tensor]],
) -> tuple[dict[str, Tensor], str]:
    """Load ``name``'s arrays for ``recipe`` from the cache, building and saving them if needed;
    with the SHA-256 of their content (:func:`content_hash`), which fingerprints the data."""
    path = cache_path(cache_dir, name, recipe)
    found = _load(path, recipe)
    if found is not None:
        return found
    arrays = build()
    return arrays, save_arrays(path, recipe, arrays)


def cached_arrays(
    cache_dir: Path,
    name: str,
    recipe: Mapping[str, Any],
    build: Callable[[], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """Load ``name``'s arrays for ``recipe`` from the cache, building and saving them if needed."""
    return cached_arrays_and_hash(cache_dir, name, recipe, build)[0]
