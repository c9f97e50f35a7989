"""Datasets: the common interface and the registered datasets."""

from mmbalance.data import av_digits, av_fashion, synthetic  # noqa: F401  (register datasets)
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
