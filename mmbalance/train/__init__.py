"""The training loop, checkpoints and batching."""

from mmbalance.train.loop import RunResult, Trainer, evaluate_run, fit

__all__ = ["RunResult", "Trainer", "evaluate_run", "fit"]
