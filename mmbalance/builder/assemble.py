"""From a resolved configuration to the parts of a run: the dataset, the method, the model and the
module the method owns, built the way every run builds them (``fit``, ``evaluate_run``,
``compare`` and the benchmarks all assemble through these functions).

Nothing here checks or converts an option again: the options were built once, by
:func:`~mmbalance.builder.resolve.resolve_config`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from mmbalance.builder.resolve import ResolvedConfig
from mmbalance.data import DATASETS
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS

if TYPE_CHECKING:
    from torch import nn

    from mmbalance.data.base import DatasetBundle
    from mmbalance.methods.base import Method, ModelInfo
    from mmbalance.models.multimodal import MultimodalModel

_DATASET_CACHE: dict[str, DatasetBundle] = {}


def cache_dir() -> Path:
    """Where prepared datasets are cached (``MMBALANCE_CACHE`` or ``~/.cache/mmbalance``)."""
    return Path(os.environ.get("MMBALANCE_CACHE", Path.home() / ".cache" / "mmbalance"))


def build_dataset(cfg: ResolvedConfig) -> DatasetBundle:
    """Build (or reuse, within this process) the dataset of ``cfg``; one that does not fit in
    memory is a one-line ConfigError."""
    name, params = cfg.dataset.name, cfg.dataset.params
    source = DATASETS.get(name)(params, cache_dir())
    # a source read from files is built again when they change (its fingerprint)
    key = f"{name}:{sorted(asdict(params).items())}:{source.fingerprint()}"
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
                f"dataset {name!r} does not fit in this machine's memory with the options "
                "given; make it smaller"
            ) from None
        _DATASET_CACHE[key] = bundle
    return _DATASET_CACHE[key]


def data_fingerprint(cfg: ResolvedConfig, data: DatasetBundle | None = None) -> str:
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
    name, params = cfg.dataset.name, cfg.dataset.params
    stamp = DATASETS.get(name)(params, cache_dir()).fingerprint()
    return stamp or recipe_hash({"dataset": name, "options": asdict(params)})


def build_model(cfg: ResolvedConfig, data: DatasetBundle, method: Method) -> MultimodalModel:
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
    cfg: ResolvedConfig, data: DatasetBundle
) -> tuple[Method, MultimodalModel, nn.Module | None]:
    """The method, the model and the method's own trainable module of a run, as ``fit`` builds
    them (benchmarks build theirs with this too, so they time what training runs)."""
    method = METHODS.get(cfg.method.name)(cfg.method.params)
    model = build_model(cfg, data, method)
    return method, model, method.setup(model_info(model, data))
