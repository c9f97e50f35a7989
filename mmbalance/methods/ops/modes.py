"""Eval mode for a while: AGM's masked passes and the feature pass of the training protocol."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def eval_mode(*modules: Any) -> Iterator[None]:
    """Run ``modules`` (those of them that are modules) in eval mode, restoring every submodule's
    mode afterwards, so that a submodule kept in eval mode (a frozen encoder) stays there."""
    tops = [m for m in modules if isinstance(m, nn.Module)]
    flags = [(sub, sub.training) for module in tops for sub in module.modules()]
    for module in tops:
        module.eval()
    try:
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag
