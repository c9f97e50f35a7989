"""Balancing methods, one module each, on the hooks of :mod:`mmbalance.methods.base`.

:data:`METHODS` knows every built-in method by name and imports a method's module when the method
is first asked for. A new method is one module registering its class with
``@METHODS.register("name")`` and one line in ``BUILTIN_METHODS`` below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmbalance.registry import Registry, lazy_exports

if TYPE_CHECKING:
    from mmbalance.methods.base import Method

#: Built-in method -> the module (of this package) that registers it.
BUILTIN_METHODS: dict[str, str] = {
    "joint": "baselines",
    "multiloss": "baselines",
    "unimodal": "baselines",
    "ensemble": "baselines",
    "unipre_frozen": "baselines",
    "unipre_finetuned": "baselines",
    "mcr": "mcr",
    "ogm": "ogm",
    "ogm_ge": "ogm",
    "opm": "opm",
    "mmpareto": "mmpareto",
    "agm": "agm",
    "amco": "amco",
    "cml": "cml",
    "dr": "dr",
    "gblending": "gblending",
    "greedy": "greedy",
    "inforeg": "inforeg",
    "lfm": "lfm",
    "mbsd": "mbsd",
    "mla": "mla",
    "mlb": "mlb",
    "mmcosine": "mmcosine",
    "mslr": "mslr",
    "pmr": "pmr",
    "reconboost": "reconboost",
    "umt": "umt",
    "valuation": "valuation",
    "aug": "aug",
    "dgl": "dgl",
    "g2d": "g2d",
    "remix": "remix",
    "midas": "midas",
}

METHODS: Registry[type[Method]] = Registry("method", __name__, BUILTIN_METHODS)

_EXPORTS: dict[str, str] = {
    "EpochContext": "base",
    "EpochSubset": "base",
    "Method": "base",
    "ModelInfo": "base",
    "Phase": "base",
    "SplitFeatures": "base",
    "StepContext": "base",
    "build_method": "base",
    "task_loss": "base",
    "total_loss": "base",
    "MethodAdapter": "adapter",
    "StepResult": "adapter",
    "TrainingProtocol": "protocol",
}

__all__ = ["BUILTIN_METHODS", "METHODS", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)
