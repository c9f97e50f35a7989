"""From a :class:`~mmbalance.config.RunConfig` to everything a run is made of.

- :func:`resolve_config` / :func:`validate`: the configuration, with every component name and
  option checked before anything trains; :func:`normalized_config`: with every default written out;
- :func:`build_dataset`, :func:`build_model`, :func:`build_components` (the method, the model and
  the module the method owns, built the way every run builds them);
- :func:`check_engine` / :func:`make_fabric`: the engine (devices, precision, DDP).

``fit``, ``evaluate_run``, ``compare`` and the benchmarks all build through these functions.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbalance.config import (
    NamedParams,
    RunConfig,
    build_config,
    build_dataclass,
    flatten_yaml,
)
from mmbalance.data import DATASETS
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.models import ENCODERS, FUSION_HEADS
from mmbalance.optim import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from torch import nn

    from mmbalance.data.base import DatasetBundle
    from mmbalance.methods.base import Method, ModelInfo
    from mmbalance.models.multimodal import MultimodalModel

_DATASET_CACHE: dict[str, DatasetBundle] = {}


def cache_dir() -> Path:
    """Where prepared datasets are cached (``MMBALANCE_CACHE`` or ``~/.cache/mmbalance``)."""
    return Path(os.environ.get("MMBALANCE_CACHE", Path.home() / ".cache" / "mmbalance"))


def resolve_config(overrides: Mapping[str, Any]) -> RunConfig:
    """Build a config, with the dataset's recommended train settings under the user's values.

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
    cfg = build_config({**defaults, **overrides})
    validate(cfg)
    return cfg


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


def validate(cfg: RunConfig) -> None:
    """Check every component name and parameter set (raises ConfigError)."""
    source = DATASETS.get(cfg.dataset.name)
    build_dataclass(source.Params, cfg.dataset.params, f"dataset.{cfg.dataset.name}")
    method_cls = METHODS.get(cfg.method.name)
    params = build_dataclass(method_cls.Params, cfg.method.params, f"method.{cfg.method.name}")
    method_cls.check_schedule(params, cfg.train.epochs)
    FUSION_HEADS.get(cfg.fusion.name)
    OPTIMIZERS.get(cfg.train.optimizer)
    SCHEDULES.get(cfg.train.scheduler)


def normalized_config(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as flat ``key: value`` pairs with every dataset, method and fusion option written
    out (defaults included) in JSON form, so that two configurations that train the same run
    compare equal even if one spells out a default the other leaves implicit."""
    flat = flatten_yaml(cfg.to_dict())
    for section, registry in (("dataset", DATASETS), ("method", METHODS)):
        named = getattr(cfg, section)
        cls = registry.get(named.name).Params
        options = asdict(build_dataclass(cls, named.params, f"{section}.{named.name}"))
        flat |= {f"{section}.{k}": v for k, v in options.items()}
    head = inspect.signature(FUSION_HEADS.get(cfg.fusion.name))
    defaults = {
        k: p.default
        for k, p in list(head.parameters.items())[2:]
        if p.default is not inspect.Parameter.empty and k not in cfg.fusion.params
    }
    flat |= {f"fusion.{k}": v for k, v in defaults.items()}
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def with_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every dataset, method and fusion-head option written out, defaults included,
    so that its ``config.yaml`` trains the same run under a later version with other defaults.
    (Encoder options come from the dataset's modality specs and the user's ``encoder.*`` keys.)"""
    flat = normalized_config(cfg)
    out = replace(cfg)
    for section in ("dataset", "method", "fusion"):
        named = getattr(cfg, section)
        params = {k.partition(".")[2]: v for k, v in flat.items() if k.startswith(f"{section}.")}
        setattr(out, section, NamedParams(named.name, params))
    return out


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two :func:`normalized_config` results, sorted."""
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def build_dataset(cfg: RunConfig) -> DatasetBundle:
    """Build (or reuse, within this process) the dataset of ``cfg``."""
    source_cls = DATASETS.get(cfg.dataset.name)
    params = build_dataclass(source_cls.Params, cfg.dataset.params, f"dataset.{cfg.dataset.name}")
    source = source_cls(params, cache_dir())
    # a source read from files is built again when they change (its fingerprint)
    key = f"{cfg.dataset.name}:{sorted(asdict(params).items())}:{source.fingerprint()}"
    if key not in _DATASET_CACHE:
        try:
            bundle = source.build()
        except MemoryError:
            bundle = None
        except RuntimeError as err:  # torch's allocator
            if "alloc" not in str(err):
                raise
            bundle = None
        if bundle is None:
            raise ConfigError(
                f"dataset {cfg.dataset.name!r} does not fit in this machine's memory with the "
                "options given; make it smaller"
            ) from None
        _DATASET_CACHE[key] = bundle
    return _DATASET_CACHE[key]


def data_fingerprint(cfg: RunConfig, data: DatasetBundle | None = None) -> str:
    """What identifies the data a run of ``cfg`` trains on (``data``: its bundle, built when
    not given): the content hash the bundle records (``details["fingerprint"]``), else its
    source's :meth:`~mmbalance.data.base.DatasetSource.fingerprint`, else (data generated from
    its options alone) a hash of the dataset's options. Runs record it, so that a comparison
    never reuses, and ``--resume`` never continues, a run trained on other data."""
    from mmbalance.data.cache import recipe_hash

    data = data if data is not None else build_dataset(cfg)
    content = data.details.get("fingerprint")
    if isinstance(content, str) and content:
        return content
    source_cls = DATASETS.get(cfg.dataset.name)
    params = build_dataclass(source_cls.Params, cfg.dataset.params, f"dataset.{cfg.dataset.name}")
    stamp = source_cls(params, cache_dir()).fingerprint()
    return stamp or recipe_hash({"dataset": cfg.dataset.name, "options": asdict(params)})


def build_model(cfg: RunConfig, data: DatasetBundle, method: Method) -> MultimodalModel:
    """Encoders from the config (or the dataset's defaults), the fusion head, unimodal heads."""
    from mmbalance.models.encoders import build_encoder
    from mmbalance.models.fusion import build_fusion
    from mmbalance.models.multimodal import MultimodalModel

    unknown = set(cfg.encoders) - set(data.modalities)
    if unknown:
        raise ConfigError(
            f"encoder settings name modalities {sorted(unknown)} that dataset "
            f"{data.name!r} lacks; its modalities: {', '.join(data.modalities)}"
        )
    encoders = {}
    for m, spec in data.modalities.items():
        chosen = cfg.encoders.get(m)
        if chosen is not None and chosen.name and chosen.name != spec.encoder:
            name, params = chosen.name, dict(chosen.params)
        else:
            name = spec.encoder
            params = {**spec.encoder_params, **(chosen.params if chosen else {})}
        encoders[m] = build_encoder(name, spec.shape, params)
    latent_dims = {m: int(enc.out_dim) for m, enc in encoders.items()}
    fusion = build_fusion(cfg.fusion.name, latent_dims, data.num_outputs, cfg.fusion.params)
    heads = cfg.unimodal_heads
    if heads is None:
        heads = method.needs_unimodal_heads
    elif not heads and method.needs_unimodal_heads:
        raise ConfigError(f"method {method.name!r} needs unimodal heads; set unimodal_heads=true")
    return MultimodalModel(encoders, fusion, unimodal_heads=heads)


def model_info(model: MultimodalModel, data: DatasetBundle) -> ModelInfo:
    """What a method may know about the model when it is set up."""
    from mmbalance.methods.base import ModelInfo, parameter_groups

    return ModelInfo(
        modalities=model.modalities,
        latent_dims=dict(model.fusion.latent_dims),
        num_outputs=data.num_outputs,
        task=data.task,
        additive_fusion=model.fusion.additive,
        parameter_groups=parameter_groups(model),
    )


def build_components(
    cfg: RunConfig, data: DatasetBundle
) -> tuple[Method, MultimodalModel, nn.Module | None]:
    """The method, the model and the method's own trainable module of a run, as ``fit`` builds
    them (benchmarks build theirs with this too, so they time what training runs)."""
    from mmbalance.methods.base import build_method

    method = build_method(cfg.method.name, cfg.method.params)
    model = build_model(cfg, data, method)
    return method, model, method.setup(model_info(model, data))


def _runs_on_cpu(cfg: RunConfig) -> bool:
    import torch

    t = cfg.train
    return t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())


def check_engine(cfg: RunConfig) -> None:
    """Refuse engine settings this machine cannot run, before any process is started (an error
    inside spawned workers would reach the user as tracebacks, a missing node as a hang)."""
    import torch

    t = cfg.train
    if t.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.accelerator={t.accelerator} but CUDA is not available on this machine; "
            "use train.accelerator=cpu (or auto)"
        )
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.accelerator=mps but MPS is not available on this machine")
    on_cpu = _runs_on_cpu(cfg)
    if on_cpu and t.precision == "16-mixed":
        # Lightning would silently switch to bf16-mixed: refuse instead of training another run
        raise ConfigError(
            "train.precision=16-mixed needs a CUDA GPU (mixed precision on CPU is bfloat16); "
            "use train.precision=bf16-mixed or 32-true"
        )
    if on_cpu and t.num_nodes > 1:
        raise ConfigError(
            f"train.num_nodes={t.num_nodes}: CPU training runs its processes on this one "
            "machine (train.devices); several nodes need GPUs started by a cluster launcher"
        )
    if not on_cpu and t.accelerator != "mps" and t.devices > torch.cuda.device_count():
        raise ConfigError(
            f"train.devices={t.devices} but this machine has {torch.cuda.device_count()} GPUs"
        )
    world = t.devices * t.num_nodes
    if t.batch_size % world:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by the {world} processes "
            "(train.devices x train.num_nodes)"
        )


def make_fabric(cfg: RunConfig) -> Fabric:
    """The Lightning Fabric of ``cfg``'s engine settings (DDP over gloo processes on CPU, one
    process per GPU otherwise); settings Lightning refuses are a one-line ConfigError."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    t = cfg.train
    world = t.devices * t.num_nodes
    strategy: Any = "auto"
    if world > 1:
        cpu = _runs_on_cpu(cfg)
        strategy = DDPStrategy(
            find_unused_parameters=True,
            start_method="spawn" if cpu else "popen",
            process_group_backend="gloo" if cpu else None,
        )
    try:
        return Fabric(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=strategy,
            precision=t.precision,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the train engine settings cannot run here: {first}") from None
