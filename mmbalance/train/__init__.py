"""The training loop, checkpoints and batching."""

from mmbalance.train.loop import RunResult, Trainer, fit

__all__ = ["RunResult", "Trainer", "fit"]
