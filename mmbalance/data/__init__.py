"""Datasets: the common interface and the registered datasets."""

from mmbalance.data import (  # noqa: F401  (register datasets)
    av_digits,
    av_fashion,
    av_fashion_cnn,
    ave,
    cremad,
    kinetics_sounds,
    mosi,
    synthetic,
    ucf101,
)
from mmbalance.data.base import (
    DATASETS,
    Batch,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
    preparable_datasets,
)

__all__ = [
    "DATASETS",
    "Batch",
    "DatasetBundle",
    "DatasetSource",
    "ModalitySpec",
    "MultimodalTensorDataset",
    "preparable_datasets",
]
