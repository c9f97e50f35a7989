"""Atomic checkpoints and RNG state capture."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmbalance.errors import DataError


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old or the new file.

    The data go to a temporary file in the same directory, are flushed to disk, and the file is
    renamed over ``path`` (``os.replace`` is atomic on POSIX), so a run killed mid-write never
    leaves a truncated checkpoint.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error if it is unusable."""
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise DataError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(err).__name__})"
        ) from None


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
