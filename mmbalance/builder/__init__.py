"""From a configuration to everything a run is made of, in three steps:

* :mod:`~mmbalance.builder.resolve`: the configuration resolved once (:func:`resolve_config` ->
  :class:`ResolvedConfig`: every component's options built and checked, defaults included);
* :mod:`~mmbalance.builder.assemble`: the dataset, the method, the model and the method's module
  of a resolved configuration (:func:`build_dataset`, :func:`build_components`) and the fingerprint of its data
  (:func:`data_fingerprint`);
* :mod:`~mmbalance.builder.engine`: the devices and processes it trains on (:func:`check_engine`,
  :func:`make_fabric`).

``fit``, ``evaluate_run``, ``compare`` and the benchmarks all build through these functions;
none of them imports torch before it is called.
"""

from __future__ import annotations

from mmbalance.builder.assemble import (
    build_components,
    build_dataset,
    build_model,
    cache_dir,
    data_fingerprint,
    model_info,
)
from mmbalance.builder.engine import check_engine, make_fabric
from mmbalance.builder.resolve import Choice, ResolvedConfig, config_differences, resolve_config

__all__ = [
    "Choice",
    "ResolvedConfig",
    "build_components",
    "build_dataset",
    "build_model",
    "cache_dir",
    "check_engine",
    "config_differences",
    "data_fingerprint",
    "make_fabric",
    "model_info",
    "resolve_config",
]
