"""Run configuration: typed sections, ``key=value`` overrides and YAML files.

A run is described by five sections (dataset, model, method, train, output). Users write either a
YAML file or ``key=value`` pairs; both go through the same validation, which rejects unknown keys
with the list of valid ones and invalid values with the allowed range, before anything trains.

Keys of the command line and of flattened YAML files:

- ``dataset=NAME``, ``dataset.PARAM=V``: dataset and its parameters
- ``method=NAME``, ``method.PARAM=V``: balancing method and its parameters
- ``fusion=NAME``, ``fusion.PARAM=V``: fusion head and its parameters
- ``encoder.MODALITY=NAME``, ``encoder.MODALITY.PARAM=V``: per-modality encoder
- ``unimodal_heads=true|false``: force unimodal heads on or off (default: as the method needs)
- ``train.FIELD=V`` (or just ``FIELD=V``): a field of :class:`TrainConfig`
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmbalance.errors import ConfigError


# --- generic typed construction ------------------------------------------------------------------
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is invalid; allowed: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}={value!r} is invalid")
    if origin in (tuple, list):
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}={value!r} is invalid; expected a list")
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, where) for v in value)
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}={value!r} is invalid; expected a mapping")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} is invalid; expected true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r} is invalid; expected an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-05" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}={value!r} is invalid; expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} is invalid; expected a string")
        return value
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, checking keys and types.

    Unknown keys raise :class:`ConfigError` listing the valid keys; values are coerced to the
    annotated types (ints become floats where a float is expected, ``Literal`` fields are checked
    against their choices). Range checks live in each dataclass's ``__post_init__``.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in values if k not in names]
    if unknown:
        valid = ", ".join(names) if names else "(none)"
        raise ConfigError(f"unknown {where} key {unknown[0]!r}; valid keys: {valid}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def check(condition: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)


# --- sections ----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation, schedule, selection and engine settings."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["none", "step", "cosine"] = "none"
    step_size: int = 70
    gamma: float = 0.1
    warmup_epochs: int = 0
    patience: int | None = None
    grad_clip: float | None = None
    seed: int = 0
    deterministic: bool = False
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int = 0
    regression_loss: Literal["l1", "mse"] = "l1"
    unimodal_pretrain_epochs: int = 0
    progress: bool = True
    tensorboard: bool = True
    #: per-modality head/probe accuracy and Shapley curves after each validation (eval.curves)
    epoch_analysis: bool = True

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "momentum", "gamma", "grad_clip"):
            value = getattr(self, name)
            check(
                value is None or math.isfinite(value), f"train.{name} must be finite, got {value}"
            )
        check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 2, f"train.batch_size must be >= 2, got {self.batch_size}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        # every generator we seed (torch, NumPy, Python, Lightning) accepts [0, 2**32)
        check(0 <= self.seed < 2**32, f"train.seed must be in [0, 2**32), got {self.seed}")
        check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.momentum < 1, f"train.momentum must be in [0, 1), got {self.momentum}")
        check(self.step_size >= 1, f"train.step_size must be >= 1, got {self.step_size}")
        check(0 < self.gamma <= 1, f"train.gamma must be in (0, 1], got {self.gamma}")
        check(self.warmup_epochs >= 0, "train.warmup_epochs must be >= 0")
        check(self.patience is None or self.patience >= 1, "train.patience must be >= 1 or null")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip must be > 0 or null")
        check(self.devices >= 1, f"train.devices must be >= 1, got {self.devices}")
        check(self.num_nodes >= 1, f"train.num_nodes must be >= 1, got {self.num_nodes}")
        check(self.num_workers >= 0, "train.num_workers must be >= 0")
        check(self.unimodal_pretrain_epochs >= 0, "train.unimodal_pretrain_epochs must be >= 0")


@dataclass
class NamedParams:
    """A registered component by name plus its keyword parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """Everything that defines one training run."""

    dataset: NamedParams = field(default_factory=lambda: NamedParams("synthetic"))
    method: NamedParams = field(default_factory=lambda: NamedParams("joint"))
    fusion: NamedParams = field(default_factory=lambda: NamedParams("late_sum"))
    encoders: dict[str, NamedParams] = field(default_factory=dict)
    unimodal_heads: bool | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The YAML-file form (sections with ``name`` plus parameters), readable by
        :func:`load_yaml`, so a run's saved ``config.yaml`` can be trained again as it is."""
        out: dict[str, Any] = {}
        for section in ("dataset", "method", "fusion"):
            named: NamedParams = getattr(self, section)
            out[section] = {"name": named.name, **named.params}
        if self.encoders:
            out["encoders"] = {m: {"name": n.name, **n.params} for m, n in self.encoders.items()}
        if self.unimodal_heads is not None:
            out["unimodal_heads"] = self.unimodal_heads
        out["train"] = dataclasses.asdict(self.train)
        return out


TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]

#: Train settings that cannot change a run's numbers: how it is shown, logged and fed (the
#: batches are a function of the seed and epoch, and datasets draw no randomness per item, so
#: the number of loader processes does not matter). Runs that differ only in these are the same
#: run: ``compare`` reuses such a run and ``--resume`` accepts new values for them.
PRESENTATION_KEYS = ("train.progress", "train.tensorboard", "train.num_workers")
KEY_HELP = (
    "dataset, dataset.PARAM, method, method.PARAM, fusion, fusion.PARAM, encoder.MODALITY, "
    "encoder.MODALITY.PARAM, unimodal_heads, train.FIELD (or FIELD) with FIELD in: "
    + ", ".join(TRAIN_KEYS)
)


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML (so ``0.1``, ``true``, ``[1, 2]`` and ``null`` work)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e6" as a string; users mean a number
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a=1", "b.c=x"]`` into ``{"a": 1, "b.c": "x"}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def flatten_yaml(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a YAML config (sections as mappings) into override keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be names, got {key!r}")
        if key in ("dataset", "method", "fusion") and isinstance(value, Mapping):
            value = dict(value)
            if "name" in value:
                out[key] = value.pop("name")
            params = value.pop("params", None)
            if params is not None and not isinstance(params, Mapping):
                raise ConfigError(f"{key}.params must be a mapping of options, got {params!r}")
            value.update(params or {})
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif key == "encoders" and isinstance(value, Mapping):
            for modality, spec in value.items():
                spec = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
                if spec.get("name"):
                    out[f"encoder.{modality}"] = spec.pop("name")
                spec.pop("name", None)
                out.update({f"encoder.{modality}.{k}": v for k, v in spec.items()})
        elif key == "train" and isinstance(value, Mapping):
            out.update({f"train.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into flat override keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(
            f"config file {str(path)!r} is unreadable ({type(err).__name__})"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {err}".splitlines()[0]
        ) from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r} must contain a mapping")
    return flatten_yaml(data)


def build_config(overrides: Mapping[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from flat keys (later keys win).

    Component parameters (``method.*`` etc.) are stored here and validated against the component
    when it is built; see :func:`mmbalance.experiment.validate`.
    """
    cfg = RunConfig()
    train_values: dict[str, Any] = {}
    sections = {"dataset": cfg.dataset, "method": cfg.method, "fusion": cfg.fusion}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in sections and not rest:
            if not isinstance(value, str):
                raise ConfigError(f"{head} must be a name, got {value!r}")
            if value != sections[head].name:
                sections[head].params.clear()
            sections[head].name = value
        elif head in sections:
            sections[head].params[rest] = value
        elif head == "encoder" and rest:
            modality, _, param = rest.partition(".")
            named = cfg.encoders.setdefault(modality, NamedParams(""))
            if param:
                named.params[param] = value
            else:
                if not isinstance(value, str):
                    raise ConfigError(f"encoder.{modality} must be a name, got {value!r}")
                named.name = value
        elif key == "unimodal_heads":
            cfg.unimodal_heads = _coerce(value, bool | None, key)
        elif head == "train" and rest:
            train_values[rest] = value
        elif key in TRAIN_KEYS:
            train_values[key] = value
        else:
            raise ConfigError(f"unknown key {key!r}; valid keys: {KEY_HELP}")
    cfg.train = build_dataclass(TrainConfig, train_values, "train")
    return cfg
