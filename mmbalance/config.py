"""Run configuration: typed sections, ``key=value`` overrides and YAML files.

A run (:class:`RunConfig`) is described by the sections ``dataset``, ``method``, ``fusion`` and
``encoders`` (each a registered name with its options), ``unimodal_heads`` and ``train``
(:class:`TrainConfig`). Users write either a YAML file or ``key=value`` pairs; both go through the
same validation, which rejects unknown keys with the list of valid ones and invalid values with
the allowed range, before anything trains (component names and options are checked against their
registries, and built, by :func:`mmbalance.builder.resolve_config`).

Keys of the command line and of flattened YAML files:

- ``dataset=NAME``, ``dataset.PARAM=V``: dataset and its parameters
- ``method=NAME``, ``method.PARAM=V``: balancing method and its parameters
- ``fusion=NAME``, ``fusion.PARAM=V``: fusion head and its parameters
- ``encoder.MODALITY=NAME``, ``encoder.MODALITY.PARAM=V``: per-modality encoder
- ``unimodal_heads=true|false``: force unimodal heads on or off (default: as the method needs)
- ``train.FIELD=V`` (or just ``FIELD=V``): a field of :class:`TrainConfig`
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from mmbalance.errors import ConfigError, DataError, shown
from mmbalance.io import read_text

# --- generic typed construction ------------------------------------------------------------------
#: The largest integer any option takes (a count, a size, a seed): 2**62, so that no option's
#: value overflows the 64-bit integers of NumPy and torch, even doubled.
LARGEST_INT = 2**62


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{where}={shown(value)} is invalid; allowed: {', '.join(map(str, args))}"
            )
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
        raise ConfigError(errors[0] if errors else f"{where}={shown(value)} is invalid")
    if origin in (tuple, list):
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}={shown(value)} is invalid; expected a list")
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, where) for v in value)
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}={shown(value)} is invalid; expected a mapping")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={shown(value)} is invalid; expected true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where}={shown(value)} is invalid; expected an integer")
        if not -LARGEST_INT <= value <= LARGEST_INT:
            raise ConfigError(f"{where}={shown(value)} is out of range for any option")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-05" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}={shown(value)} is invalid; expected a number")
        try:
            value = float(value)
        except OverflowError:  # an int beyond every float
            raise ConfigError(f"{where}={shown(value)} is out of range for any option") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {shown(value)}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={shown(value)} is invalid; expected a string")
        return value
    return value


def renamed_options(cls: type) -> dict[str, str]:
    """The options of dataclass ``cls`` that were renamed, ``{old name: new name}``.

    A class declares its renamed options once, in a class attribute ``renamed_options``
    (a ``ClassVar`` mapping, inherited and extended by subclasses); every path that turns user
    keys into options (YAML files, ``key=value`` pairs, comparison variants) goes through
    :func:`build_dataclass`, which answers an old name with one line naming the new one.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(klass.__dict__.get("renamed_options", {}))
    return out


def build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, checking keys and types.

    Unknown keys raise :class:`ConfigError` listing the valid keys, and a renamed key (see
    :func:`renamed_options`) one naming its new name; values are coerced to the annotated types
    (ints become floats where a float is expected, ``Literal`` fields are checked against their
    choices). Range checks live in each dataclass's ``__post_init__``.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in values if k not in names]
    if unknown:
        renamed = renamed_options(cls)
        old = next((k for k in unknown if k in renamed), None)
        if old is not None:
            raise ConfigError(f"{where} key {old!r} was renamed: use {renamed[old]!r} instead")
        valid = ", ".join(names) if names else "(none)"
        raise ConfigError(f"unknown {where} key {unknown[0]!r}; valid keys: {valid}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


@functools.cache
def signature_dataclass(factory: Callable[..., Any], positional: int) -> type:
    """A dataclass of the keyword options of ``factory`` (a class or a function): its parameters
    after the first ``positional`` ones, with their annotations and defaults, so that
    :func:`build_dataclass` checks an encoder's or a fusion head's options (whose builders
    supply the positional ones: an input shape; latent sizes and a number of outputs) as it
    checks a ``Params`` dataclass."""
    init = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    hints = _hints(init)
    fields: list[tuple[str, Any, Any]] = []
    for p in list(inspect.signature(factory).parameters.values())[positional:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        annotation = hints.get(p.name, Any)
        if isinstance(annotation, str):  # an annotation that does not resolve: accept any value
            annotation = Any
        if p.default is inspect.Parameter.empty:
            fields.append((p.name, annotation, dataclasses.field()))
        else:
            default = functools.partial(copy.deepcopy, p.default)
            fields.append((p.name, annotation, dataclasses.field(default_factory=default)))
    name = f"{getattr(factory, '__name__', 'component')}Options"
    return dataclasses.make_dataclass(name, fields, kw_only=True)


def check(condition: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)


# --- sections ----------------------------------------------------------------------------------
#: The largest training batch (2**24 samples; evaluation uses twice this).
MAX_BATCH_SIZE = 2**24


@dataclass
class TrainConfig:
    """Optimisation, schedule, selection and engine settings.

    Attributes:
        epochs: training epochs (fewer with early stopping).
        batch_size: training batch size (evaluation uses twice this).
        optimizer: the optimizer, a name of ``mmbalance.optim.OPTIMIZERS`` (``adam``, ``adamw``,
            ``sgd``; train.momentum applies to sgd only).
        lr: base learning rate.
        weight_decay: the optimizer's weight decay.
        momentum: SGD momentum (unused by Adam and AdamW).
        scheduler: learning-rate schedule after warm-up, a name of
            ``mmbalance.optim.SCHEDULES``: ``none``, ``step`` (times gamma every step_size
            epochs) or ``cosine`` (to 0 at the last epoch).
        step_size: epochs between two decays of the ``step`` schedule.
        gamma: factor of each decay of the ``step`` schedule.
        warmup_epochs: epochs of linear learning-rate warm-up before the schedule.
        patience: stop after this many epochs without a better validation score; null: never.
        grad_clip: clip the gradients' total norm to this value; null: no clipping.
        seed: seeds the model, the batches and every method's randomness.
        deterministic: ask torch for deterministic algorithms (slower; warns where there are
            none).
        precision: numeric precision of training (Lightning Fabric's; mixed precision on GPUs).
        accelerator: the device type to train on (auto: a GPU where there is one).
        devices: devices per node (more than 1: distributed data parallel).
        num_nodes: machines taking part in distributed training.
        num_workers: data-loader worker processes (0: load in the training process).
        regression_loss: the loss of regression tasks (classification uses cross-entropy).
        unimodal_pretrain_epochs: epochs of unimodal pre-training of every encoder with its
            unimodal head before the run (0: none, unless the method needs it, which then uses
            train.epochs).
        progress: show the training progress.
        tensorboard: write TensorBoard events to the run directory.
        wandb: log to Weights & Biases under this project name (null: no W&B; needs
            ``pip install 'mmbalance[wandb]'``; ``WANDB_MODE=offline`` logs without an account).
        epoch_curves: per-modality head/probe accuracy and Shapley curves after each
            validation (:mod:`mmbalance.eval.curves`).
        compile: ``torch.compile`` the training step's forward (the model and the method's
            losses): ``false``, ``true``, or ``auto`` (compile only where the saving measured on
            the first steps, over the run's steps, exceeds the compile time); see
            :mod:`mmbalance.train.compiling`.
    """

    renamed_options: ClassVar[dict[str, str]] = {"epoch_analysis": "epoch_curves"}

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "none"
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
    wandb: str | None = None
    epoch_curves: bool = True
    compile: bool | Literal["auto"] = False

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "momentum", "gamma", "grad_clip"):
            value = getattr(self, name)
            check(
                value is None or math.isfinite(value), f"train.{name} must be finite, got {value}"
            )
        check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        if self.wandb is not None:
            # W&B's own rule for project names, checked before anything trains
            check(
                isinstance(self.wandb, str)
                and 0 < len(self.wandb) <= 128
                and not set(self.wandb) & set("/\\#?%:")
                and self.wandb.strip() == self.wandb,
                "train.wandb must be a W&B project name (1 to 128 characters, none of / \\ # ? % :)",
            )
        check(
            2 <= self.batch_size <= MAX_BATCH_SIZE,
            f"train.batch_size must be in [2, {MAX_BATCH_SIZE}], got {self.batch_size}",
        )
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
    """A run's configuration as parsed from flat keys: each component's name and its options
    as given, unchecked (:func:`mmbalance.builder.resolve_config` checks and builds them into a
    :class:`~mmbalance.builder.ResolvedConfig`, which is what runs)."""

    dataset: NamedParams = field(default_factory=lambda: NamedParams("synthetic"))
    method: NamedParams = field(default_factory=lambda: NamedParams("joint"))
    fusion: NamedParams = field(default_factory=lambda: NamedParams("late_sum"))
    encoders: dict[str, NamedParams] = field(default_factory=dict)
    unimodal_heads: bool | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]

#: Train settings that cannot change a run's numbers: how it is shown, logged and fed (the
#: batches are a function of the seed and epoch, and datasets draw no randomness per item, so
#: the number of loader processes does not matter). Runs that differ only in these are the same
#: run: ``compare`` reuses such a run and ``--resume`` accepts new values for them.
PRESENTATION_KEYS = ("train.progress", "train.tensorboard", "train.wandb", "train.num_workers")
KEY_HELP = (
    "dataset, dataset.PARAM, method, method.PARAM, fusion, fusion.PARAM, encoder.MODALITY, "
    "encoder.MODALITY.PARAM, unimodal_heads, train.FIELD (or FIELD) with FIELD in: "
    + ", ".join(TRAIN_KEYS)
)


#: How deeply a configuration value may nest (lists in lists in mappings...).
MAX_YAML_DEPTH = 32


class _YamlRefused(yaml.YAMLError):
    """YAML that a configuration never needs and that could hang or exhaust memory."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``: a few hundred bytes of nested aliases
    expand to gigabytes) and with nesting limited to :data:`MAX_YAML_DEPTH` levels (deeper
    input would exhaust Python's recursion)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _YamlRefused("aliases (*name) are not accepted in a configuration")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlRefused(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_config_yaml(text: str, where: str) -> Any:
    """``text`` read as YAML by :class:`ConfigLoader`; aliases, deep nesting and malformed YAML
    are a one-line :class:`~mmbalance.errors.ConfigError` naming ``where``."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except _YamlRefused as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}".splitlines()[0]) from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def parse_value(text: str, where: str = "value") -> Any:
    """Parse a command-line value as YAML (so ``0.1``, ``true``, ``[1, 2]`` and ``null`` work).
    Text that is not YAML stays text; aliases and deep nesting are refused (:class:`ConfigLoader`)."""
    try:
        value = yaml.load(text, Loader=ConfigLoader)
    except _YamlRefused as err:
        raise ConfigError(f"{where}: {err}") from None
    except (yaml.YAMLError, RecursionError):
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
            raise ConfigError(f"expected key=value, got {shown(pair)}")
        out[key.strip()] = parse_value(value.strip(), shown(key.strip(), 40))
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


#: The configs shipped with the package (the papers' settings), by relative name.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def config_path(name: str | Path) -> Path:
    """The file a config argument names: a path that exists, else a config shipped with the
    package (``mcr/cremad_resnet.yaml``, also spelled ``configs/mcr/cremad_resnet.yaml``)."""
    path = Path(name)
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    packaged = PACKAGED_CONFIGS.joinpath(*parts) if parts else PACKAGED_CONFIGS
    return packaged if packaged.is_file() else path


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (or a config shipped with the package, see :func:`config_path`)
    into flat override keys."""
    path = config_path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist (nor is it one of the configs shipped "
            f"with mmbalance: {str(PACKAGED_CONFIGS)!r})"
        )
    where = f"config file {str(path)!r}"
    try:
        text = read_text(path, limit=1 << 20, what=where)
    except DataError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"{where} is unreadable ({type(err).__name__})") from None
    data = load_config_yaml(text, where) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r} must contain a mapping")
    return flatten_yaml(data)


def build_config(overrides: Mapping[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from flat keys (later keys win).

    Component options (``method.*`` etc.) are stored as given here; they are checked against
    their components when the configuration is resolved (:func:`mmbalance.builder.resolve_config`).
    """
    cfg = RunConfig()
    train_values: dict[str, Any] = {}
    sections = {"dataset": cfg.dataset, "method": cfg.method, "fusion": cfg.fusion}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in sections and not rest:
            if not isinstance(value, str):
                raise ConfigError(f"{head} must be a name, got {shown(value)}")
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
                    raise ConfigError(f"encoder.{modality} must be a name, got {shown(value)}")
                named.name = value
        elif key == "unimodal_heads":
            cfg.unimodal_heads = _coerce(value, bool | None, key)
        elif head == "train" and rest:
            train_values[rest] = value
        elif key in TRAIN_KEYS or key in renamed_options(TrainConfig):
            train_values[key] = value
        elif key == "plugins":
            raise ConfigError(
                "plugins are no run option: pass --plugin MODULE_OR_FILE on the command line, "
                "or plugins: [...] in a YAML config given on the command line"
            )
        else:
            raise ConfigError(f"unknown key {key!r}; valid keys: {KEY_HELP}")
    cfg.train = build_dataclass(TrainConfig, train_values, "train")
    return cfg


# --- option documentation ------------------------------------------------------------------------
# The convention (tests/test_options.py holds every registered component to it): each option is
# documented by one entry of a Google-style section of a docstring, ``name: what it does``, with
# continuation lines indented further:
#
# - a ``Params`` dataclass (methods, datasets, preparation, :class:`TrainConfig`) documents its
#   fields in an ``Attributes:`` section of its own docstring or of a base class's; a field that
#   no such section names may instead have a ``#:`` comment on the line(s) just above it;
# - an encoder or fusion head, whose options are keyword arguments of its constructor, documents
#   them in an ``Args:`` section of its class docstring (or of its ``__init__``).
#
# ``mmbalance list NAME`` prints what :func:`dataclass_options` and :func:`signature_options`
# extract from them.

_SECTION = re.compile(r"^(Attributes|Args|Arguments|Parameters):\s*$")
_ANY_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:$")
_ENTRY = re.compile(r"^(\w+(?:\s*,\s*\w+)*)\s*(?:\([^)]*\))?\s*:(?:\s+(.*))?$")
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


@dataclass(frozen=True)
class OptionDoc:
    """One option of a component, as ``mmbalance list NAME`` shows it.

    Attributes:
        name: the option's key (``method.NAME=VALUE``).
        type: the accepted values in words (``float``, ``int | null``, ``greedy | independent``).
        default: the default value (meaningless when ``required``).
        required: the option has no default.
        help: the option's documentation as plain text; empty when it has none.
    """

    name: str
    type: str
    default: Any
    required: bool
    help: str


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText markup: ``:class:`~a.B``` -> ``B``, double
    backticks dropped, whitespace collapsed to single spaces."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return " ".join(text.replace("``", "").split())


def docstring_summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s own docstring as plain text ("" if it has none)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return plain_text(paragraph)


def docstring_entries(doc: str | None) -> dict[str, str]:
    """The entries of every ``Attributes:`` / ``Args:`` section of a Google-style docstring.

    ``name: text`` starts an entry (``a, b: text`` documents both; ``name (type): text`` is
    accepted); lines indented deeper than the entry continue it; the section ends at the first
    non-blank line indented no deeper than its header. Returns ``{name: plain text}``.
    """
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    entries: list[tuple[list[str], list[str]]] = []
    base: int | None = None  # indentation of the current section's header
    entry_indent: int | None = None
    for row, line in enumerate(lines):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        ends = _ANY_SECTION.match(line.strip()) and indent <= (entry_indent or 0)
        if base is not None and (indent <= base or ends):
            base = None
        if base is None:
            if _SECTION.match(line.strip()):
                # a header on the docstring's first line lost its indentation to cleandoc
                base, entry_indent = (indent if row else -1), None
            continue
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(line.strip()) if indent <= entry_indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            entries.append((names, [match.group(2) or ""]))
        elif entries:
            entries[-1][1].append(line.strip())
    found: dict[str, str] = {}
    for names, parts in entries:
        for name in names:
            found.setdefault(name, plain_text(" ".join(parts)))
    return found


def _comment_help(cls: type) -> dict[str, str]:
    """``#:`` comments on the lines just above each field of ``cls``'s own class body, or at the
    end of its line: the fallback for fields that no docstring section documents."""
    try:
        lines, _ = inspect.getsourcelines(cls)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    found: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 1
        parts = []
        while row > 0 and lines[row - 1].strip().startswith("#:"):
            row -= 1
            parts.insert(0, lines[row].strip()[2:])
        _, marker, trailing = lines[node.end_lineno - 1].partition("#:")  # type: ignore[operator]
        if marker:
            parts.append(trailing)
        text = plain_text(" ".join(parts))
        if text:
            found[node.target.id] = text
    return found


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that does not resolve at run time: show it as written
        return dict(getattr(obj, "__annotations__", {}))


def dataclass_options(cls: type) -> list[OptionDoc]:
    """Every init field of dataclass ``cls`` (bases' fields included) with its type, default and
    help: the nearest class in the MRO whose docstring section documents the field, else a ``#:``
    comment above the field in the class that declares it, else ""."""
    hints = _hints(cls)
    entries = [docstring_entries(k.__dict__.get("__doc__")) for k in cls.__mro__]
    comments: list[dict[str, str]] | None = None  # read from the source only when needed
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        help_text = next((e[f.name] for e in entries if f.name in e), "")
        if not help_text:
            if comments is None:
                comments = [_comment_help(k) for k in cls.__mro__ if dataclasses.is_dataclass(k)]
            help_text = next((c[f.name] for c in comments if f.name in c), "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(
            OptionDoc(f.name, type_text(hints.get(f.name, Any)), default, required, help_text)
        )
    return out


def signature_options(factory: Callable[..., Any], positional: int) -> list[OptionDoc]:
    """The keyword options of ``factory`` (a class or a function), i.e. its parameters after the
    first ``positional`` ones (which its builder supplies: an encoder's input shape, a fusion
    head's latent sizes and number of outputs), with help from the ``Args:`` section of the
    class docstring, then of ``__init__``'s (or the function's)."""
    init = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    params = list(inspect.signature(factory).parameters.values())[positional:]
    hints = _hints(init)
    entries: dict[str, str] = {}
    for doc in (factory.__doc__, init.__doc__):
        for name, text in docstring_entries(doc).items():
            entries.setdefault(name, text)
    out = []
    for p in params:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        required = p.default is inspect.Parameter.empty
        out.append(
            OptionDoc(
                p.name,
                type_text(hints.get(p.name, Any)),
                None if required else p.default,
                required,
                entries.get(p.name, ""),
            )
        )
    return out


def type_text(annotation: Any) -> str:
    """The accepted values of ``annotation`` in a user's words: ``float``, ``int | null``,
    ``greedy | independent | collaborative``, ``list of int``."""
    if isinstance(annotation, str):
        return annotation
    if annotation is None or annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_text(a) for a in args))
    if origin in (list, tuple, set, frozenset) or origin in _SEQUENCES:
        inner = [a for a in args if a is not Ellipsis]
        return "list of " + " | ".join(dict.fromkeys(type_text(a) for a in inner or [Any]))
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return "mapping"
    if annotation in (list, tuple):
        return "list"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


_SEQUENCES = (Sequence, Iterable)


def value_text(value: Any) -> str:
    """A value as a user writes it in ``key=value`` (``null``, ``true``, ``[1, 2]``, ``0.001``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)
