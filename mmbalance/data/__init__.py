"""Datasets: the common interface and the registered datasets."""

from mmbalance.data import synthetic  # noqa: F401  (registers "synthetic")
from mmbalance.data.base import (
    DATASETS,
    Batch,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
)

__all__ = [
    "DATASETS",
    "Batch",
    "DatasetBundle",
    "DatasetSource",
    "ModalitySpec",
    "MultimodalTensorDataset",
]
