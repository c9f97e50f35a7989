"""``mosi`` and ``mosei``: CMU-MOSI / CMU-MOSEI sentiment from the aligned-feature pickle.

The file (``dataset.path``) is the MulT / MultiBench pickle: a dict with ``train``, ``valid`` and
``test``, each a dict of ``vision`` ``(N, L, Dv)``, ``text`` ``(N, L, 300)``, ``audio``
``(N, L, Da)`` and ``labels`` (N sentiment scores in [-3, 3], any trailing singleton axes).
MOSI has Dv 20 / Da 5, MOSEI 35 / 74. The task is regression (L1 loss by default), also scored as
binary accuracy on the sign. Audio features hold ``-inf`` (log of zero energy): every ``-inf``
and NaN becomes 0, as the reference loaders do.

The pickle is read by :func:`mmbalance.data.safe_unpickler.load_arrays`, which admits only NumPy
arrays and plain containers, so a file from elsewhere cannot run code. ``dataset.modalities`` picks a subset (e.g. the V-T setting).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmbalance.config import check
from mmbalance.data.base import (
    DATASETS,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
    error_text,
)
from mmbalance.data.safe_unpickler import UnsafePickleError, load_arrays
from mmbalance.errors import DataError
from mmbalance.io import open_regular

MODALITIES = ("vision", "audio", "text")
SPLITS = {"train": "train", "val": "valid", "test": "test"}
FEATURE_DIMS = {
    "mosi": {"vision": 20, "audio": 5, "text": 300},
    "mosei": {"vision": 35, "audio": 74, "text": 300},
}


def read_pickle_bytes(path: Path) -> bytes:
    """The bytes of the regular file ``path`` (a FIFO would hang the read), or a one-line
    :class:`DataError`."""
    if not path.exists():
        raise DataError(
            f"{path} does not exist; set dataset.path to the aligned-feature pickle "
            "(train/valid/test x vision/text/audio/labels)"
        )
    try:
        with open_regular(path) as f:
            return f.read()
    except OSError as err:
        raise DataError(f"{path} is unreadable ({err.strerror}); check its permissions") from None


def load_pickle(path: Path, data: bytes | None = None) -> Any:
    """The pickle at ``path`` (or its ``data`` already read), read by
    :func:`mmbalance.data.safe_unpickler.load_arrays` (arrays and plain containers only), or a
    one-line :class:`DataError`."""
    if data is None:
        data = read_pickle_bytes(path)
    try:
        return load_arrays(data)
    except UnsafePickleError as err:
        raise DataError(
            f"{path} was not loaded: it asks for more than arrays ({error_text(err)}); the "
            "aligned-feature pickle holds only NumPy arrays in dicts, so use the published file"
        ) from None
    except Exception as err:
        raise DataError(
            f"{path} is not a readable pickle ({type(err).__name__}: {error_text(err)}); "
            "download the aligned-feature file again"
        ) from None


_KIND_NAMES = {"U": "text", "S": "bytes", "O": "Python object", "c": "complex", "V": "record"}


def numeric_array(value: Any, where: str) -> np.ndarray:
    """``value`` as a float32 array, or a one-line :class:`DataError` if it is not numeric."""
    if isinstance(value, list | tuple):
        try:
            value = np.asarray(value)
        except ValueError:
            raise DataError(f"{where} is a ragged list, not an array") from None
    if not isinstance(value, np.ndarray):
        raise DataError(f"{where} is a {type(value).__name__}, not an array")
    if value.dtype.kind not in "biuf":
        kind = _KIND_NAMES.get(value.dtype.kind, str(value.dtype))
        raise DataError(f"{where} holds {kind} values, not numbers")
    return value.astype(np.float32, copy=False)


@dataclass
class MosiParams:
    """Options of MOSI / MOSEI.

    Attributes:
        path: the aligned-feature pickle (MulT / MultiBench layout).
        modalities: the modalities used, two or three of vision, audio, text (null: all
            three).
    """

    path: str | None = None
    modalities: list[str] | None = None

    def __post_init__(self) -> None:
        if self.modalities is None:
            self.modalities = list(MODALITIES)
        check(
            len(self.modalities) >= 2
            and len(set(self.modalities)) == len(self.modalities)
            and set(self.modalities) <= set(MODALITIES),
            f"dataset.modalities must be 2 or 3 distinct names of {', '.join(MODALITIES)}, "
            f"got {self.modalities}",
        )


class _SentimentSource(DatasetSource):
    Params = MosiParams
    name: ClassVar[str] = ""
    # MCR's MOSI/MOSEI setting (MultiBench loader: batch 32; Adam 1e-4, wd 1e-4; L1).
    train_defaults = {
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "batch_size": 32,
        "epochs": 100,
        "regression_loss": "l1",
    }

    def build(self) -> DatasetBundle:
        p: MosiParams = self.params
        assert p.modalities is not None
        if not p.path:
            raise DataError(f"dataset.path is not set; point it at the {self.name} pickle")
        path = Path(p.path).expanduser()
        raw = read_pickle_bytes(path)
        data = load_pickle(path, raw)
        if not isinstance(data, dict):
            raise DataError(f"{path} holds a {type(data).__name__}, not a dict of splits")
        expected = FEATURE_DIMS[self.name]
        absent = [k for k in SPLITS.values() if not isinstance(data.get(k), dict)]
        if absent:
            raise DataError(f"{path} lacks the splits {absent} (needs train, valid, test)")
        splits = {}
        for split, key in SPLITS.items():
            part = data[key]
            missing = [k for k in (*p.modalities, "labels") if k not in part]
            if missing:
                raise DataError(f"{path}: split {key!r} lacks the keys {missing}")
            labels = numeric_array(part["labels"], f"{path}: {key}/labels")
            if labels.ndim == 0 or len(labels) == 0:
                raise DataError(f"{path}: split {key!r} holds no samples")
            labels = labels.reshape(len(labels), -1)
            if labels.shape[1] != 1:
                raise DataError(f"{path}: {key}/labels has {labels.shape[1]} values per sample")
            if not np.isfinite(labels).all():
                raise DataError(f"{path}: {key}/labels holds NaN or infinite sentiment scores")
            inputs = {}
            for m in p.modalities:
                x = numeric_array(part[m], f"{path}: {key}/{m}")
                if x.ndim != 3 or x.shape[-1] != expected[m]:
                    raise DataError(
                        f"{path}: {key}/{m} has shape {x.shape}, expected (N, L, {expected[m]}) "
                        f"for {self.name}; is this the right dataset's file?"
                    )
                x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
                inputs[m] = torch.from_numpy(np.ascontiguousarray(x))
            targets = torch.from_numpy(labels[:, 0].copy())
            splits[split] = MultimodalTensorDataset(inputs, targets)
        specs = {
            m: ModalitySpec(
                m,
                tuple(splits["train"].inputs[m].shape[1:]),
                "sequence_transformer",
                {"d_model": 40, "heads": 4, "layers": 2},
            )
            for m in p.modalities
        }
        return DatasetBundle(
            name=self.name,
            task="regression",
            num_outputs=1,
            modalities=specs,
            splits=splits,
            notes=(
                f"{self.name} aligned features from {path}; the file's train/valid/test split; "
                "-inf and NaN features set to 0; sentiment regression in [-3, 3]"
            ),
            details={"fingerprint": hashlib.sha256(raw).hexdigest()},
        )

    def fingerprint(self) -> str | None:
        """A hash of the pickle's size, times and inode (which change whenever the file does;
        the file itself can be gigabytes): the SHA-256 of its content is in the bundle's
        ``details["fingerprint"]``."""
        path = Path(self.params.path or "").expanduser()
        try:
            st = path.stat()
        except (OSError, ValueError):
            return None
        stamp = f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        return hashlib.sha256(stamp.encode()).hexdigest()


@DATASETS.register("mosi")
class MosiSource(_SentimentSource):
    name = "mosi"
    description = "CMU-MOSI sentiment (regression): vision 20 / audio 5 / text 300 features"


@DATASETS.register("mosei")
class MoseiSource(_SentimentSource):
    name = "mosei"
    description = "CMU-MOSEI sentiment (regression): vision 35 / audio 74 / text 300 features"
