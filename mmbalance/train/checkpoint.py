"""Atomic checkpoints that load without running code, and RNG state as plain tensors.

A checkpoint is read with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler
admits tensors, plain containers and numbers, and refuses every other global, so a planted file
cannot run code when a shared run directory is evaluated or resumed. Everything we save is
therefore made of tensors and plain Python values: the RNG states of ``random`` and NumPy (a
tuple and an array in their own APIs) are stored as integer and float tensors, and
:func:`plain` converts (or refuses, at save time) anything else, so our own files always pass the
safe load.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmbalance.errors import DataError
from mmbalance.io import check_zip_archive, save_atomic

__all__ = [
    "BEST_KEYS",
    "LAST_KEYS",
    "checkpoint_budget",
    "load_checkpoint",
    "plain",
    "rng_state",
    "save_atomic",
    "save_checkpoint",
    "set_rng_state",
]

#: what ``last.ckpt`` (everything needed to resume) and ``best.ckpt`` (selected weights) hold
LAST_KEYS = (
    "epoch",
    "module",
    "optimizer",
    "method",
    "rng",
    "step",
    "history",
    "step_logs",
    "best",
    "bad_epochs",
)
BEST_KEYS = ("model", "epoch")


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as tensors and plain Python values only (what ``weights_only`` loading admits).

    NumPy scalars become Python numbers and NumPy arrays tensors; tuples, lists and dicts are
    converted recursively. Anything else raises ``TypeError`` naming where it sits, so a value
    that the safe load would refuse is caught when it is saved, not when a run is resumed.
    """
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where} holds a {type(obj).__name__}, which a safe checkpoint cannot store")


def save_checkpoint(obj: Mapping[str, Any], path: Path) -> None:
    """Save a checkpoint atomically, after making it plain (see :func:`plain`)."""
    save_atomic(plain(obj), path)


def load_checkpoint(
    path: Path,
    required: Sequence[str] = (),
    max_bytes: int | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint without executing anything it contains.

    Raises a one-line :class:`DataError` when the file is missing, not a regular file,
    truncated, not a checkpoint, holds compressed entries or declares more than ``max_bytes``
    (default: its own size; see :func:`checkpoint_budget`), holds anything but tensors and plain
    values (a pickle that would run code), is not a mapping, or lacks one of the ``required``
    keys. The sizes are checked in the archive's directory before any tensor is read.
    ``mmap``: map the tensors' storage instead of reading it (to read a small entry).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    check_zip_archive(path, path.stat().st_size if max_bytes is None else max_bytes)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise DataError(
            f"checkpoint {str(path)!r} is corrupt, unreadable or holds more than tensors and "
            f"plain values, and was not loaded ({type(err).__name__})"
        ) from None
    if not isinstance(ckpt, dict):
        raise DataError(
            f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint mapping"
        )
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise DataError(
            f"checkpoint {str(path)!r} is not a checkpoint of this kind (missing "
            f"{', '.join(missing)})"
        )
    return ckpt


def checkpoint_budget(*modules: torch.nn.Module) -> int:
    """The most a checkpoint of ``modules`` can hold: their parameters and buffers four times
    over (the weights, an optimizer's two moments, a method's copies) plus 64 MiB for the
    history, step logs and RNG states. A checkpoint declaring more was not written for this
    configuration, and is refused before it is read."""
    weights = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    return 4 * weights + (64 << 20)


def rng_state() -> dict[str, torch.Tensor]:
    """The RNG states of torch (and CUDA), NumPy and ``random`` of this process, as tensors
    (so they can be all-gathered over ranks and saved in a ``weights_only`` checkpoint)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    assert kind == "MT19937"
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor(
            [math.nan if gauss_next is None else gauss_next], dtype=torch.float64
        ),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    try:
        # a fresh contiguous copy: the generator reads the tensor's storage from its start
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8).clone())
        pos, has_gauss = (int(v) for v in state["numpy_pos"])
        keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
        version, *internal = (int(v) for v in state["python"])
        gauss = float(state["python_gauss"][0])
        random.setstate((version, tuple(internal), None if math.isnan(gauss) else gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.clone() for s in state["cuda"].to("cpu", torch.uint8)])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"the checkpoint's RNG state is damaged ({type(err).__name__})") from None
