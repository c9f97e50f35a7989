"""A configuration resolved once: every component's options built and checked, defaults included.

:func:`resolve_config` turns the flat keys of a command line or a YAML file into a
:class:`ResolvedConfig`: the dataset's and the method's ``Params`` dataclasses, the fusion head's
options (every keyword of its constructor), the encoder choices the user made (checked against
the encoder they name) and the :class:`~mmbalance.config.TrainConfig`. Every component name is
checked before any component's module is imported, and every option before anything trains.

Everything downstream reads the resolved configuration and builds nothing from it again: the
run directory (:meth:`ResolvedConfig.identity` is what makes two runs the same run,
:meth:`ResolvedConfig.to_dict` is the ``config.yaml`` written with every default), the assembly
of the dataset, model and method (:mod:`mmbalance.builder.assemble`), the trainer, comparisons
and reports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmbalance.config import (
    RunConfig,
    TrainConfig,
    build_config,
    build_dataclass,
    flatten_yaml,
    signature_dataclass,
)
from mmbalance.data import DATASETS
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.models import ENCODERS, FUSION_HEADS
from mmbalance.optim import OPTIMIZERS, SCHEDULES

#: The positional arguments that a builder supplies to an encoder (its input shape) and to a
#: fusion head (the latent sizes and the number of outputs); the rest are the user's options.
ENCODER_POSITIONAL, FUSION_POSITIONAL = 1, 2


@dataclass
class Choice:
    """A registered component as a resolved run uses it: its name and its options, built and
    checked (an instance of the component's ``Params`` dataclass for a dataset or a method; a
    mapping of keyword options for a fusion head, every keyword included, and for an encoder,
    the options the user gave)."""

    name: str
    params: Any


@dataclass
class ResolvedConfig:
    """Everything that defines one training run, resolved: what :func:`resolve_config` returns
    and what ``fit``, ``compare``, the trainer and the benchmarks read.

    Attributes:
        dataset: the dataset and its built ``Params``.
        method: the balancing method and its built ``Params``.
        fusion: the fusion head and every one of its keyword options.
        encoders: per modality, the encoder the user chose and the options they gave (checked
            against that encoder); a modality the user left alone, or whose options only were
            given (name ``""``), uses the dataset's encoder with the dataset's options under
            the user's.
        unimodal_heads: force unimodal heads on or off; None: as the method needs.
        train: the training settings.

    Change a run with :meth:`with_option`, :meth:`with_train`, :meth:`with_method` or
    ``dataclasses.replace``: each checks the result again, so a changed run is as valid as a
    resolved one. (The fields are not frozen only because Lightning rebuilds the arguments it
    hands to spawned processes field by field.)
    """

    dataset: Choice
    method: Choice
    fusion: Choice
    encoders: Mapping[str, Choice] = field(default_factory=dict)
    unimodal_heads: bool | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for section, registry in (("dataset", DATASETS), ("method", METHODS)):
            choice: Choice = getattr(self, section)
            expected = registry.get(choice.name).Params
            if not isinstance(choice.params, expected):
                raise TypeError(
                    f"{section}.params of {choice.name!r} must be a {expected.__name__}, "
                    f"got {type(choice.params).__name__}"
                )
        METHODS.get(self.method.name).check_schedule(self.method.params, self.train.epochs)

    # --- what a run is --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The YAML-file form, every dataset, method and fusion-head option written out
        (defaults included), so that the ``config.yaml`` of a run trains the same run under a
        later version with other defaults; readable by :func:`~mmbalance.config.load_yaml`."""
        out: dict[str, Any] = {
            "dataset": {"name": self.dataset.name, **_options(self.dataset.params)},
            "method": {"name": self.method.name, **_options(self.method.params)},
            "fusion": {"name": self.fusion.name, **self.fusion.params},
        }
        if self.encoders:
            out["encoders"] = {m: {"name": c.name, **c.params} for m, c in self.encoders.items()}
        if self.unimodal_heads is not None:
            out["unimodal_heads"] = self.unimodal_heads
        out["train"] = dataclasses.asdict(self.train)
        return json.loads(json.dumps(out, default=str))

    def identity(self) -> dict[str, Any]:
        """The run as flat ``key: value`` pairs (every option, in JSON form): two
        configurations train the same run exactly when their identities are equal, whether or
        not one spells out a default that the other leaves implicit."""
        return dict(sorted(flatten_yaml(self.to_dict()).items()))

    # --- changed runs ---------------------------------------------------------------------------
    def with_option(self, option: str, value: Any) -> ResolvedConfig:
        """This run with one option set: ``dataset.KEY``, ``method.KEY``, ``fusion.KEY`` or
        ``train.FIELD`` (checked like any option)."""
        section, _, key = option.partition(".")
        if section in ("dataset", "method") and key:
            choice: Choice = getattr(self, section)
            registry = DATASETS if section == "dataset" else METHODS
            values = {**_options(choice.params), key: value}
            built = build_dataclass(
                registry.get(choice.name).Params, values, f"{section}.{choice.name}"
            )
            return dataclasses.replace(self, **{section: Choice(choice.name, built)})
        if section == "fusion" and key:
            params = _fusion_options(self.fusion.name, {**self.fusion.params, key: value})
            return dataclasses.replace(self, fusion=Choice(self.fusion.name, params))
        if section == "train" and key:
            return self.with_train(**{key: value})
        raise ConfigError(
            f"cannot set option {option!r}: not a dataset, method, fusion or train option"
        )

    def with_train(self, **changes: Any) -> ResolvedConfig:
        """This run with some training settings changed (checked like any setting)."""
        values = {**dataclasses.asdict(self.train), **changes}
        return dataclasses.replace(self, train=build_dataclass(TrainConfig, values, "train"))

    def with_method(self, name: str, options: Mapping[str, Any] | None = None) -> ResolvedConfig:
        """This run with another method (its options: ``options`` over its defaults)."""
        METHODS.require(name)
        params = build_dataclass(METHODS.get(name).Params, options or {}, f"method.{name}")
        return dataclasses.replace(self, method=Choice(name, params))


def _options(params: Any) -> dict[str, Any]:
    """The init fields of a ``Params`` instance (what :func:`build_dataclass` takes back)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}


def _fusion_options(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every keyword option of fusion head ``name``: ``values`` checked, over the defaults."""
    spec = signature_dataclass(FUSION_HEADS.get(name), FUSION_POSITIONAL)
    return _options(build_dataclass(spec, values, f"fusion.{name}"))


def _encoder_options(modality: str, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The options the user gave for ``modality``'s encoder, checked against encoder ``name``
    (unchecked without a name: the dataset's encoder is known once the dataset is built)."""
    if not name:
        return dict(values)
    spec = signature_dataclass(ENCODERS.get(name), ENCODER_POSITIONAL)
    built = build_dataclass(spec, values, f"encoder.{modality}")
    return {k: getattr(built, k) for k in values}


def _resolve(cfg: RunConfig) -> ResolvedConfig:
    """Build and check every option of a parsed configuration (raises ConfigError)."""
    dataset = DATASETS.get(cfg.dataset.name)
    method = METHODS.get(cfg.method.name)
    OPTIMIZERS.get(cfg.train.optimizer)
    SCHEDULES.get(cfg.train.scheduler)
    return ResolvedConfig(
        dataset=Choice(
            cfg.dataset.name,
            build_dataclass(dataset.Params, cfg.dataset.params, f"dataset.{cfg.dataset.name}"),
        ),
        method=Choice(
            cfg.method.name,
            build_dataclass(method.Params, cfg.method.params, f"method.{cfg.method.name}"),
        ),
        fusion=Choice(cfg.fusion.name, _fusion_options(cfg.fusion.name, cfg.fusion.params)),
        encoders={
            m: Choice(c.name, _encoder_options(m, c.name, c.params))
            for m, c in cfg.encoders.items()
        },
        unimodal_heads=cfg.unimodal_heads,
        train=cfg.train,
    )


def resolve_config(overrides: Mapping[str, Any]) -> ResolvedConfig:
    """Resolve flat keys (a command line's, a YAML file's): the dataset's recommended train
    settings under the user's values, a method's own fusion head by default, then every option
    built and checked (:func:`_resolve`).

    Every component name is checked first, before any component's module is imported, so an
    unknown name fails fast.
    """
    _require_names(overrides)
    name = overrides.get("dataset", "synthetic")
    source = DATASETS.get(name) if isinstance(name, str) else None
    defaults: dict[str, Any] = {}
    if source is not None:
        user_train = {k.removeprefix("train.") for k in overrides}
        defaults = {
            f"train.{k}": v for k, v in source.train_defaults.items() if k not in user_train
        }
    method_name = overrides.get("method")
    method_cls = METHODS.get(method_name) if isinstance(method_name, str) else None
    if method_cls is not None and method_cls.fusion is not None:
        # a method defined on one fusion head (a cosine or shared head) gets it by default, and
        # refuses another one
        given = overrides.get("fusion", method_cls.fusion)
        if given != method_cls.fusion:
            raise ConfigError(
                f"method {method_name!r} is defined on fusion head {method_cls.fusion!r}; "
                f"got fusion={given!r}"
            )
        defaults["fusion"] = method_cls.fusion
    return _resolve(build_config({**defaults, **overrides}))


def _require_names(overrides: Mapping[str, Any]) -> None:
    for key, registry in (
        ("dataset", DATASETS),
        ("method", METHODS),
        ("fusion", FUSION_HEADS),
        ("train.optimizer", OPTIMIZERS),
        ("train.scheduler", SCHEDULES),
    ):
        name = overrides.get(key)
        if isinstance(name, str):
            registry.require(name)
    for key, name in overrides.items():
        if key.startswith("encoder.") and key.count(".") == 1 and isinstance(name, str):
            ENCODERS.require(name)


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two :meth:`ResolvedConfig.identity` results,
    sorted."""
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))
