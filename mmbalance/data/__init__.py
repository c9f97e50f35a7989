"""Datasets: the common interface (:mod:`mmbalance.data.base`) and one module per dataset.

:data:`DATASETS` knows every built-in dataset by name and imports its module when the dataset is
first asked for. A new dataset is one module registering its source with
``@DATASETS.register("name")`` and one line in ``BUILTIN_DATASETS`` below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmbalance.registry import Registry, lazy_exports

if TYPE_CHECKING:
    from mmbalance.data.base import DatasetSource

#: Built-in dataset -> the module (of this package) that registers it.
BUILTIN_DATASETS: dict[str, str] = {
    "av-digits": "av_digits",
    "av-fashion": "av_fashion",
    "av-fashion-cnn": "av_fashion_cnn",
    "ave": "ave",
    "cremad": "cremad",
    "features": "features",
    "kinetics_sounds": "kinetics_sounds",
    "manifest": "manifest",
    "mosi": "mosi",
    "mosei": "mosi",
    "synthetic": "synthetic",
    "ucf101": "ucf101",
}

DATASETS: Registry[type[DatasetSource]] = Registry("dataset", __name__, BUILTIN_DATASETS)

_EXPORTS: dict[str, str] = {
    "Batch": "base",
    "DatasetBundle": "base",
    "DatasetSource": "base",
    "ModalitySpec": "base",
    "MultimodalTensorDataset": "base",
    "preparable_datasets": "base",
}

__all__ = ["BUILTIN_DATASETS", "DATASETS", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)
