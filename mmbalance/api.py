"""The Python API: :func:`compare` and :func:`fit` with the command line's arguments, and your own
objects where the command line takes names.

``compare`` takes what ``mmbalance compare`` takes (methods with variants and named sets, seeds,
``search``, ``key=value`` overrides, plugins) and returns the records and the report's paths.
Where the command names a dataset or an encoder, both functions also take an object:

* ``dataset``: a registered name; a :class:`~mmbalance.data.base.DatasetSource` instance (its
  class is registered under its class name if it is not yet, and its ``params`` become
  ``dataset.*`` options); or in-memory arrays as the ``features`` dataset reads them
  (``{"image": ..., "audio": ..., "y": ...}``). Arrays are written once to
  ``OUT/data/features-<sha256>.npz`` and trained through the ``features`` dataset, so a
  comparison on arrays gives the records that ``mmbalance compare --dataset features`` gives on
  the same file, and its run directories can be evaluated and reported from the command line;
* ``encoders``: ``{modality: factory}``, a factory being a callable ``(input_shape, **options)
  -> nn.Module`` with an ``out_dim`` attribute (an ``nn.Module`` class like the built-ins), or
  an ``nn.Module`` instance, which every run copies (so every run starts from its weights), or a
  registered encoder's name. Factories and instances are registered under their (class) name.

A run directory of a dataset or encoder given as a Python object names it by that name: a later
command that has to rebuild it (``evaluate``, ``--resume``) needs it registered again, by the
same script or as a plugin (``--plugin your_module``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbalance.compare import (
    Comparison,
    Executor,
    ExecutorOptions,
    make_executor,
    run_comparison,
    split_methods,
)
from mmbalance.config import parse_overrides
from mmbalance.data import DATASETS
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.io import claim_output, write_bytes_atomic
from mmbalance.models import ENCODERS
from mmbalance.plugins import load_entry_points, load_plugins

if TYPE_CHECKING:
    from mmbalance.train import RunResult

#: What :func:`compare` and :func:`fit` accept as a dataset.
DatasetArg = Any
#: What they accept as one modality's encoder.
EncoderArg = Any


def _as_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """``{"train.lr": 0.01}`` as it is, or ``["train.lr=0.01"]`` parsed as on the command line."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a mapping or a list of key=value strings")
    return parse_overrides(overrides)


def _is_arrays(value: Any) -> bool:
    import numpy as np

    return isinstance(value, Mapping) and all(
        isinstance(v, np.ndarray | list | tuple) or hasattr(v, "__array__") for v in value.values()
    )


def _register(registry: Any, obj: Any, name: str) -> str:
    """``obj`` under ``name`` in ``registry``, unless it is registered already (under any
    name); a name taken by another object of the user's own code is taken over (a script or a
    notebook cell that runs again defines its classes anew), a built-in's or a plugin's is not."""
    existing = registry.name_of(obj)
    if existing is not None:
        return existing
    if name in registry and registry.origin(name).startswith("module "):
        registry.unregister(name)
    registry.register(name)(obj)
    return name


def arrays_file(arrays: Mapping[str, Any], directory: Path) -> Path:
    """Write in-memory feature arrays once to ``directory/features-<sha256>.npz`` (named by
    their content, so other arrays never reuse runs trained on these); returns the file."""
    import numpy as np

    from mmbalance.data.features import arrays_fingerprint

    converted = {str(k): np.asarray(v) for k, v in arrays.items()}
    for key, value in converted.items():
        if value.dtype.hasobject:
            raise ConfigError(f"array {key!r} holds Python objects; give numbers (or text)")
    path = Path(directory) / f"features-{arrays_fingerprint(converted)[:16]}.npz"
    if not path.is_file():
        buffer = io.BytesIO()
        np.savez(buffer, **converted)
        write_bytes_atomic(path, buffer.getvalue())
    return path


def dataset_overrides(dataset: DatasetArg, out: Path) -> dict[str, Any]:
    """The ``dataset`` keys of a dataset given by name, as a source instance or as arrays."""
    if dataset is None:
        return {}
    if isinstance(dataset, str):
        return {"dataset": dataset}
    from mmbalance.data.base import DatasetSource

    if isinstance(dataset, DatasetSource):
        name = _register(DATASETS, type(dataset), type(dataset).__name__)
        params = dataset.params
        options = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}
        return {"dataset": name, **{f"dataset.{k}": v for k, v in options.items()}}
    if isinstance(dataset, type) and issubclass(dataset, DatasetSource):
        return {"dataset": _register(DATASETS, dataset, dataset.__name__)}
    if _is_arrays(dataset):
        return {"dataset": "features", "dataset.path": str(arrays_file(dataset, out / "data"))}
    raise ConfigError(
        "dataset must be a registered name, a DatasetSource instance or a mapping of arrays "
        f"(modalities and y), got {type(dataset).__name__}"
    )


def _module_factory(module: Any) -> Callable[..., Any]:
    """A factory that gives every run its own copy of ``module`` (its weights as given)."""
    if not hasattr(module, "out_dim"):
        raise ConfigError(
            f"encoder {type(module).__name__} has no out_dim attribute; set it to the size of "
            "the latent its forward returns"
        )

    def factory(input_shape: Sequence[int]) -> Any:
        return copy.deepcopy(module)

    factory.__name__ = factory.__qualname__ = type(module).__name__
    factory.__module__ = type(module).__module__
    factory.__doc__ = type(module).__doc__
    return factory


_MODULE_FACTORIES: dict[int, Callable[..., Any]] = {}


def encoder_overrides(encoders: Mapping[str, EncoderArg] | None) -> dict[str, Any]:
    """The ``encoder.<modality>`` keys of encoders given by name, factory or module."""
    out: dict[str, Any] = {}
    if not encoders:
        return out  # the command line's path: no torch before a name is known to be valid
    from torch import nn

    for modality, encoder in encoders.items():
        if isinstance(encoder, str):
            out[f"encoder.{modality}"] = encoder
            continue
        if isinstance(encoder, nn.Module):
            factory = _MODULE_FACTORIES.setdefault(id(encoder), _module_factory(encoder))
            name = f"{type(encoder).__name__}_{id(encoder):x}"
        elif callable(encoder):
            factory, name = encoder, getattr(encoder, "__name__", type(encoder).__name__)
        else:
            raise ConfigError(
                f"encoder of {modality!r} must be a name, a factory (input_shape -> nn.Module) "
                f"or an nn.Module, got {type(encoder).__name__}"
            )
        out[f"encoder.{modality}"] = _register(ENCODERS, factory, name)
    return out


def _prepare(
    dataset: DatasetArg,
    encoders: Mapping[str, EncoderArg] | None,
    overrides: Mapping[str, Any] | Sequence[str] | None,
    plugins: Sequence[str],
    out: Path,
) -> dict[str, Any]:
    load_entry_points()
    load_plugins(plugins, "python")
    values = _as_overrides(overrides)
    values |= dataset_overrides(dataset, out)
    values |= encoder_overrides(encoders)
    return values


def compare(
    methods: str | Sequence[str],
    dataset: DatasetArg = None,
    *,
    out: str | Path,
    seeds: int = 3,
    search: bool = False,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    encoders: Mapping[str, EncoderArg] | None = None,
    plugins: Sequence[str] = (),
    report: bool = True,
    metrics: str | Sequence[str] | None = None,
    executor: str | Executor = "local",
    executor_options: ExecutorOptions | Mapping[str, Any] | None = None,
) -> Comparison:
    """``mmbalance compare`` from Python: train every method (names, ``NAME[KEY=V,...]``
    variants, named sets such as ``table1``) on ``seeds`` seeds, optionally after the
    equal-budget validation ``search``, into ``out``; then the table and the report
    (:func:`mmbalance.compare.run_comparison` with the command's arguments and your objects;
    it returns its :class:`~mmbalance.compare.Comparison`).

    ``dataset`` is a name, a :class:`DatasetSource` instance or feature arrays (see the module
    docstring); ``overrides`` are ``key=value`` settings (a mapping or a list of strings);
    ``encoders`` maps modalities to encoder names, factories or modules; ``plugins`` are
    imported first, as ``--plugin`` would; ``metrics`` picks the table's columns as
    ``--metrics`` does (``"accuracy,ece"`` or a list); ``executor`` runs the runs as
    ``--executor`` does: a name (``local``, ``processes``, ``ray``, ``slurm``) with
    ``executor_options`` (:class:`~mmbalance.compare.ExecutorOptions` or a mapping of its
    fields: ``{"jobs": 2}``), or an :class:`~mmbalance.compare.Executor`. Errors are :class:`~mmbalance.errors.MMBalanceError`
    with the command's one-line messages; runs that did not finish are in ``failed``.
    """
    from mmbalance.report import parse_metrics

    out = Path(out)
    specs = split_methods(methods if isinstance(methods, str) else ",".join(methods))
    if metrics is not None and not isinstance(metrics, str):
        metrics = ",".join(metrics)
    picked = parse_metrics(metrics) if metrics else None  # checked before anything trains
    if _is_arrays(dataset):  # their file is written into ``out``: own it first
        claim_output(out, "comparison")
    if isinstance(executor, str):
        if isinstance(executor_options, Mapping):
            executor_options = _executor_options(executor_options)
        executor = make_executor(executor, executor_options, out)
    elif executor_options is not None:
        raise ConfigError("executor_options go with an executor's name, not an Executor")
    values = _prepare(dataset, encoders, overrides, plugins, out)
    return run_comparison(
        specs,
        values,
        out,
        seeds=seeds,
        search=search,
        report=report,
        metrics=picked,
        executor=executor,
    )


def _executor_options(values: Mapping[str, Any]) -> ExecutorOptions:
    known = [f.name for f in dataclasses.fields(ExecutorOptions)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"unknown executor option {unknown[0]!r}; options: {', '.join(known)}")
    return ExecutorOptions(**values)


def fit(
    method: str = "joint",
    dataset: DatasetArg = None,
    *,
    out: str | Path,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    encoders: Mapping[str, EncoderArg] | None = None,
    plugins: Sequence[str] = (),
    resume: bool = False,
) -> RunResult:
    """``mmbalance train`` from Python, with the same objects as :func:`compare`: one run of
    ``method`` (a name) into ``out``; returns its :class:`~mmbalance.train.RunResult`."""
    from mmbalance.builder import resolve_config
    from mmbalance.train import fit as fit_config

    out = Path(out)
    if _is_arrays(dataset):  # their file is written into ``out``: own it first
        claim_output(out, "run")
    values = _prepare(dataset, encoders, overrides, plugins, out)
    cfg = resolve_config({**values, "method": method})
    return fit_config(cfg, out, resume=resume)


__all__ = ["Comparison", "MMBalanceError", "compare", "fit"]
