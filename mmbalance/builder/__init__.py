"""From a configuration to everything a run is made of, in three steps:

* :mod:`~mmbalance.builder.resolve`: the configuration resolved once (:func:`resolve_config` ->
  :class:`ResolvedConfig`: every component's options built and checked, defaults included);
* :mod:`~mmbalance.builder.assemble`: the dataset, the method, the model and the method's module
  of a resolved configuration (:func:`build_dataset`, :func:`build_components`);
* :mod:`~mmbalance.builder.engine`: the devices and processes it trains on (:func:`check_engine`,
  :func:`make_fabric`).

``fit``, ``evaluate_run``, ``compare`` and the benchmarks all build through these functions. The
public names are imported on first use.
"""

from __future__ import annotations

from mmbalance.registry import lazy_exports

_EXPORTS: dict[str, str] = {
    "Choice": "resolve",
    "ResolvedConfig": "resolve",
    "config_differences": "resolve",
    "resolve_config": "resolve",
    "build_components": "assemble",
    "build_dataset": "assemble",
    "build_model": "assemble",
    "cache_dir": "assemble",
    "model_info": "assemble",
    "check_engine": "engine",
    "make_fabric": "engine",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
