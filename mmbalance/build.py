"""From a :class:`~mmbalance.config.RunConfig` to a dataset, a model and a method.

All validation of component names and parameters happens here, before any training starts.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmbalance.config import RunConfig, build_config, build_dataclass, flatten_yaml
from mmbalance.data import DATASETS, DatasetBundle
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS, Method, ModelInfo
from mmbalance.models import FUSION_HEADS, MultimodalModel, build_encoder, build_fusion

_DATASET_CACHE: dict[str, DatasetBundle] = {}


def cache_dir() -> Path:
    """Where prepared datasets are cached (``MMBALANCE_CACHE`` or ``~/.cache/mmbalance``)."""
    return Path(os.environ.get("MMBALANCE_CACHE", Path.home() / ".cache" / "mmbalance"))


def resolve_config(overrides: Mapping[str, Any]) -> RunConfig:
    """Build a config, with the dataset's recommended train settings under the user's values."""
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


def validate(cfg: RunConfig) -> None:
    """Check every component name and parameter set (raises ConfigError)."""
    source = DATASETS.get(cfg.dataset.name)
    build_dataclass(source.Params, cfg.dataset.params, f"dataset.{cfg.dataset.name}")
    method_cls = METHODS.get(cfg.method.name)
    build_dataclass(method_cls.Params, cfg.method.params, f"method.{cfg.method.name}")
    FUSION_HEADS.get(cfg.fusion.name)


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


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two :func:`normalized_config` results, sorted."""
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def build_dataset(cfg: RunConfig) -> DatasetBundle:
    """Build (or reuse, within this process) the dataset of ``cfg``."""
    source_cls = DATASETS.get(cfg.dataset.name)
    params = build_dataclass(source_cls.Params, cfg.dataset.params, f"dataset.{cfg.dataset.name}")
    key = f"{cfg.dataset.name}:{sorted(asdict(params).items())}"
    if key not in _DATASET_CACHE:
        _DATASET_CACHE[key] = source_cls(params, cache_dir()).build()
    return _DATASET_CACHE[key]


def build_method(cfg: RunConfig) -> Method:
    cls = METHODS.get(cfg.method.name)
    return cls(build_dataclass(cls.Params, cfg.method.params, f"method.{cfg.method.name}"))


def build_model(cfg: RunConfig, data: DatasetBundle, method: Method) -> MultimodalModel:
    """Encoders from the config (or the dataset's defaults), the fusion head, unimodal heads."""
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
    return ModelInfo(
        modalities=model.modalities,
        latent_dims=dict(model.fusion.latent_dims),
        num_outputs=data.num_outputs,
        task=data.task,
        additive_fusion=model.fusion.additive,
    )
