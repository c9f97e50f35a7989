"""Training: the loop, its callbacks, batching, checkpoints and run directories."""

from mmbalance.train.callbacks import Callback, default_callbacks
from mmbalance.train.loop import RunResult, Trainer
from mmbalance.train.runner import evaluate_run, fit

__all__ = ["Callback", "RunResult", "Trainer", "default_callbacks", "evaluate_run", "fit"]
