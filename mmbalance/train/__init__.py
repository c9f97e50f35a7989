"""Training: the loop, its callbacks, batching, checkpoints and run directories.

The public names are imported on first use, so that the run-directory checks
(:mod:`mmbalance.train.rundir`) load without torch.
"""

from __future__ import annotations

from mmbalance.registry import lazy_exports

_EXPORTS: dict[str, str] = {
    "Callback": "loop",
    "default_callbacks": "callbacks",
    "evaluate_run": "runner",
    "fit": "runner",
    "RunResult": "loop",
    "Trainer": "loop",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
