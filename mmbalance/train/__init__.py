"""Training: the loop, its callbacks, batching, checkpoints and run directories.

The public names are imported on first use, so that the run-directory checks
(:mod:`mmbalance.train.rundir`) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Callback": "callbacks",
    "default_callbacks": "callbacks",
    "evaluate_run": "runner",
    "fit": "runner",
    "RunResult": "loop",
    "Trainer": "loop",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The package's public names, imported on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
