"""``features``: per-modality arrays that the user computed, from a file.

``dataset.path`` is one of

* an ``.npz`` file (``numpy.savez``), read with ``allow_pickle=False``: every member's header is
  read first and a member that is no ``.npy`` array, an object array or a structured array is
  refused before any array data is read, so nothing in the file can run code; a plain pickle
  named ``.npz`` is refused by its first byte;
* a ``.safetensors`` file (a format without code by design);
* a directory of ``.npy`` files, one array each (``image.npy``, ``y.npy``...), each read with
  ``allow_pickle=False`` and its header checked the same way.

The arrays, all with the same first axis (one row per sample):

* one array per modality, named by its key: a vector ``(N, d)`` gets the ``mlp`` encoder, a
  sequence ``(N, L, d)`` the ``sequence_transformer``, an image ``(N, C, H, W)`` or a clip
  ``(N, C, T, H, W)`` the ``resnet18`` (with its small-input stem up to 64 pixels); the user
  overrides any of them with ``encoder.<modality>=NAME``;
* ``y``: the labels, integer or text classes, or floats for regression (``dataset.task``; in
  ``auto`` integers and text are classes, fractional floats are regression, and floats that are
  all whole numbers are ambiguous, so they ask for the task). Classes are mapped to 0..C-1 in
  sorted order of their values; ``y_names`` (text, optional) names the integer labels:
  ``y_names[k]`` is the name of label ``k``, as scikit-learn's ``target_names``;
* ``split`` (optional): ``train``/``val``/``test`` as text or 0/1/2 per sample. Without it, a
  stratified split with ``dataset.val_fraction``, ``dataset.test_fraction`` and
  ``dataset.split_seed`` (a plain random split for regression); with it but without validation
  samples, the validation split is carved from train the same way;
* ``mask_<modality>`` (optional): true (or 1) where that modality is missing for the sample.
  Missing samples' values are ignored (NaN allowed there), left out of the standardisation
  statistics and set to 0 after standardisation, i.e. to the training mean.

Standardisation (``dataset.standardize``) uses the training split's statistics only: ``vectors``
(the default) standardises every vector modality per feature, ``all`` also sequences (per
feature of the last axis) and images and clips (per channel), ``none`` nothing.

The run directory's ``data.json`` records the file's SHA-256 (the dataset's content
fingerprint), the label mapping and class names (which the report shows), the split (its
sizes and the SHA-256 of its indices: every method and seed of a comparison trains on the same
split) and the standardisation statistics. Every mistake in a file (arrays of different
lengths, NaN or infinite values, a class too small for the split, an object array or a pickle,
an unknown key, no ``y``, a single class) is a one-line :class:`~mmbalance.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from mmbalance.config import check
from mmbalance.data.base import (
    DATASETS,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
    stratified_split,
)
from mmbalance.errors import DataError
from mmbalance.io import open_regular

#: Keys with a meaning of their own; every other key is a modality.
LABELS, LABEL_NAMES, SPLIT, MASK_PREFIX = "y", "y_names", "split", "mask_"
SPLITS = ("train", "val", "test")
#: Spellings of the splits in a ``split`` array.
SPLIT_VALUES = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
#: What a modality may be called (it appears in ``encoder.<modality>=...`` keys); names that
#: start like the keys with a meaning (``y_...``, ``split_...``) are taken for misspellings.
MODALITY_NAME = re.compile(r"(?!y_|split_)[A-Za-z][A-Za-z0-9_-]*")
#: Keys that look like labels under another name (a hint when ``y`` is missing).
LABEL_LIKE = ("label", "labels", "target", "targets", "Y", "class", "classes")
_KINDS = {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex", "V": "records"}
_RESNET_SMALL_INPUT = 64


@dataclass
class FeaturesParams:
    """Options of the features dataset.

    Attributes:
        path: an .npz file, a .safetensors file or a directory of .npy files holding one
            array per modality and y (see `mmbalance list features`).
        task: auto (integer or text labels: classification; fractional floats: regression),
            classification or regression.
        modalities: the modalities used, in this order (null: every modality of the file,
            sorted by name).
        val_fraction: share of the samples in the validation split when the file has no split
            array (or carved from its train split when that has no validation samples).
        test_fraction: share of the samples in the test split when the file has no split
            array.
        split_seed: seed of the stratified split (fixed, so that every method and seed of a
            comparison trains on the same split).
        standardize: vectors (standardise every vector modality per feature), all (also
            sequences per feature and images per channel) or none; statistics of the training
            split only.
    """

    path: str | None = None
    task: Literal["auto", "classification", "regression"] = "auto"
    modalities: list[str] | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    standardize: Literal["vectors", "all", "none"] = "vectors"

    def __post_init__(self) -> None:
        check(
            0 < self.val_fraction < 1 and 0 < self.test_fraction < 1,
            "dataset.val_fraction and dataset.test_fraction must be in (0, 1)",
        )
        check(
            self.val_fraction + self.test_fraction < 1,
            f"dataset.val_fraction + dataset.test_fraction must leave training samples, got "
            f"{self.val_fraction} + {self.test_fraction}",
        )
        check(0 <= self.split_seed < 2**32, "dataset.split_seed must be in [0, 2**32)")
        if self.modalities is not None:
            check(
                len(set(self.modalities)) == len(self.modalities),
                f"dataset.modalities names a modality twice: {self.modalities}",
            )


# --------------------------------------------------------------------------- reading files


@dataclass
class FeatureFile:
    """The arrays of a features file, with where they came from.

    Attributes:
        arrays: key -> array, in the file's order.
        origin: the file or directory, for messages.
        fingerprint: SHA-256 of the content (the file's bytes; for a directory, of every
            ``.npy`` file's name and bytes).
        format: npz, safetensors, npy directory or arrays (given in Python).
    """

    arrays: dict[str, np.ndarray]
    origin: str
    fingerprint: str
    format: str


def _refuse_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.kind in "cVMm":
        kind = _KINDS.get(dtype.kind, str(dtype))
        raise DataError(
            f"{where} is an array of {kind} ({dtype}); a features file holds numbers (and text "
            "for y, y_names and split) only, and object arrays are never loaded"
        )


def _npy_header(fp: Any, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an ``.npy`` header (a literal, read without evaluating code)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as err:
        raise DataError(f"{where} is not a readable .npy array ({err})") from None
    _refuse_dtype(dtype, where)
    return tuple(shape), dtype


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as fh:  # a FIFO would hang the read
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open_regular(path) as fh:
        head = fh.read(4)
    if head[:1] == b"\x80" or not head.startswith(b"PK"):
        what = "a pickle" if head[:1] == b"\x80" else "not an .npz (zip) archive"
        raise DataError(
            f"{path} is {what}; a features .npz holds arrays only (numpy.savez), and pickles "
            "are never loaded"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                where = f"{path}: member {info.filename!r}"
                if not info.filename.endswith(".npy"):
                    raise DataError(
                        f"{where} is not an .npy array; a features .npz holds arrays only "
                        "(numpy.savez), and pickles are never loaded"
                    )
                with archive.open(info) as member:
                    _npy_header(member, where)
    except zipfile.BadZipFile as err:
        raise DataError(f"{path} is a damaged .npz archive ({err})") from None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not a readable .npz ({err})".splitlines()[0]) from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.dtype in (torch.bfloat16, torch.float16):
                    tensor = tensor.float()
                out[key] = tensor.numpy()
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DataError(f"{path} is not a readable .safetensors file ({err})") from None
    return out


def _npy_files(path: Path) -> list[Path]:
    """Every ``.npy`` entry but directories (a FIFO among them is refused when opened)."""
    return sorted(p for p in path.iterdir() if p.suffix == ".npy" and not p.is_dir())


def _read_npy_dir_digest(path: Path) -> str:
    """SHA-256 over every ``.npy`` file's name and SHA-256, in name order."""
    h = hashlib.sha256()
    for file in _npy_files(path):
        h.update(f"{file.name}|{file_sha256(file)}|".encode())
    return h.hexdigest()


def _read_npy_dir(path: Path) -> tuple[dict[str, np.ndarray], str]:
    files = _npy_files(path)
    if not files:
        raise DataError(f"{path} holds no .npy files; save one array per file (image.npy, y.npy)")
    out = {}
    for file in files:
        with open_regular(file) as fh:  # a FIFO would hang the read
            _npy_header(fh, str(file))
        try:
            out[file.stem] = np.load(file, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise DataError(f"{file} is not a readable .npy array ({err})") from None
    return out, _read_npy_dir_digest(path)


def read_feature_file(path: str | Path) -> FeatureFile:
    """The arrays of an ``.npz``, a ``.safetensors`` or a directory of ``.npy`` files, read so
    that nothing in them can run code, or a one-line :class:`DataError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"{path} does not exist; set dataset.path to an .npz, a .safetensors or a "
            "directory of .npy files"
        )
    try:
        if path.is_dir():
            arrays, fingerprint = _read_npy_dir(path)
            return FeatureFile(arrays, str(path), fingerprint, "npy directory")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return FeatureFile(_read_npz(path), str(path), file_sha256(path), "npz")
        if suffix == ".safetensors":
            digest = file_sha256(path)  # first: it opens only a regular file
            return FeatureFile(_read_safetensors(path), str(path), digest, "safetensors")
    except PermissionError:
        raise DataError(f"{path} is unreadable (permission denied)") from None
    raise DataError(
        f"{path} is no .npz, .safetensors or directory of .npy files; save the features with "
        "numpy.savez, safetensors or numpy.save"
    )


def arrays_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the keys, dtypes, shapes and bytes of in-memory arrays (key order)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- checking contents


def _as_text(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S":
        try:
            return np.char.decode(values, "utf-8")
        except UnicodeDecodeError:
            raise DataError("a text array is not UTF-8") from None
    return values


@dataclass
class Labels:
    """Labels mapped to what the model trains on.

    Attributes:
        task: classification or regression.
        targets: class indices 0..C-1 (int64) or regression targets (float32).
        values: each class's value in the file (int or text); empty for regression.
        names: each class's name.
    """

    task: Literal["classification", "regression"]
    targets: np.ndarray
    values: list[Any]
    names: list[str]


def read_labels(arrays: Mapping[str, np.ndarray], task: str, origin: str) -> Labels:
    """``y`` (and ``y_names``) mapped to 0..C-1, or the regression targets; one-line errors for
    a missing, malformed, non-finite or single-class ``y``."""
    if LABELS not in arrays:
        similar = [k for k in arrays if k in LABEL_LIKE]
        hint = f" (found {similar[0]!r}: rename it to y)" if similar else ""
        raise DataError(
            f"{origin} has no labels: save them as an array named y{hint}; its keys: "
            f"{', '.join(arrays)}"
        )
    y = np.asarray(arrays[LABELS])
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{origin}: y has shape {y.shape}; it needs one label per sample, shape (N,)"
        )
    _refuse_dtype(y.dtype, f"{origin}: y")
    kind = y.dtype.kind
    if kind in "US":
        y = _as_text(y)
    numeric = kind in "biuf"
    if numeric:
        _refuse_non_finite(y, f"{origin}: y")
    if task == "auto":
        if kind == "f":
            finite = y[np.isfinite(y)]
            if finite.size and np.all(finite == np.round(finite)):
                raise DataError(
                    f"{origin}: y holds floats that are all whole numbers, which can be classes "
                    "or regression targets; set dataset.task=classification or "
                    "dataset.task=regression"
                )
            task = "regression"
        else:
            task = "classification"
    if task == "regression":
        if not numeric or kind == "b":
            raise DataError(f"{origin}: dataset.task=regression needs numeric y, got {y.dtype}")
        if LABEL_NAMES in arrays:
            raise DataError(f"{origin}: y_names names classes, but dataset.task=regression")
        return Labels("regression", y.astype(np.float32), [], [])
    if kind == "f":
        if not np.all(y == np.round(y)):
            raise DataError(
                f"{origin}: dataset.task=classification but y holds fractional values "
                f"(first at sample {int(np.argmax(y != np.round(y)))})"
            )
        y = y.astype(np.int64)
    if kind == "b":
        y = y.astype(np.int64)
    values, targets = np.unique(y, return_inverse=True)
    if len(values) < 2:
        raise DataError(
            f"{origin}: y has a single class ({values[0] if len(values) else 'none'}); "
            "a classifier needs two classes or more"
        )
    names = [str(v) for v in values]
    if LABEL_NAMES in arrays:
        given = np.asarray(arrays[LABEL_NAMES])
        _refuse_dtype(given.dtype, f"{origin}: y_names")
        if given.ndim != 1 or given.dtype.kind not in "US":
            raise DataError(f"{origin}: y_names must be a 1-D array of text, one name per label")
        given = _as_text(given)
        if y.dtype.kind not in "iu":
            raise DataError(f"{origin}: y_names names integer labels, but y holds {y.dtype}")
        if values.min() < 0 or values.max() >= len(given):
            raise DataError(
                f"{origin}: y holds the label {int(values.max() if values.max() >= len(given) else values.min())}, "
                f"but y_names names labels 0..{len(given) - 1} only"
            )
        names = [str(given[int(v)]) for v in values]
        if len(set(names)) < len(names):
            raise DataError(f"{origin}: y_names gives two labels the same name")
    plain = [v.item() if isinstance(v, np.generic) else v for v in values]
    return Labels("classification", targets.astype(np.int64), plain, names)


def _refuse_non_finite(x: np.ndarray, where: str, present: np.ndarray | None = None) -> None:
    """One-line error with the count and the first sample of NaN or infinite values."""
    if x.dtype.kind != "f":
        return
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    rows = bad.reshape(len(x), -1).any(axis=1)
    if present is not None:
        rows &= present
        if not rows.any():
            return
        bad = bad & present.reshape((-1,) + (1,) * (x.ndim - 1))
    first = int(np.argmax(rows))
    hint = "" if where.endswith("y") else " or mark those samples missing with mask_<modality>"
    raise DataError(
        f"{where} holds {int(bad.sum())} NaN or infinite values (first at sample {first}); "
        f"replace them{hint}"
    )


def read_split(arrays: Mapping[str, np.ndarray], origin: str) -> np.ndarray | None:
    """The ``split`` array as 0 (train), 1 (val), 2 (test), or None when there is none."""
    if SPLIT not in arrays:
        return None
    raw = np.asarray(arrays[SPLIT])
    _refuse_dtype(raw.dtype, f"{origin}: split")
    if raw.ndim != 1:
        raise DataError(f"{origin}: split has shape {raw.shape}; it needs one entry per sample")
    if raw.dtype.kind in "US":
        text = np.char.lower(_as_text(raw))
        out = np.full(len(text), -1, dtype=np.int64)
        for word, code in SPLIT_VALUES.items():
            out[text == word] = code
    elif raw.dtype.kind in "iu":
        out = raw.astype(np.int64)
        out[(out < 0) | (out > 2)] = -1
    else:
        raise DataError(f"{origin}: split holds {raw.dtype}; use train/val/test or 0/1/2")
    if (out < 0).any():
        first = int(np.argmax(out < 0))
        raise DataError(
            f"{origin}: split holds {raw[first]!r} at sample {first}; use train/val/test or 0/1/2"
        )
    return out


def _min_per_class(fractions: Sequence[float]) -> int:
    """The fewest samples a class needs for every part of :func:`stratified_split` to get one."""
    for n in range(1, 10_000):
        cuts = (np.round(np.cumsum([0.0, *fractions]) * n)).astype(int)
        if np.all(np.diff(cuts) >= 1):
            return n
    return 10_000


def default_encoder(shape: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    """The encoder of a modality by its per-sample shape (see the module docstring)."""
    if len(shape) == 1:
        return "mlp", {}
    if len(shape) == 2:
        return "sequence_transformer", {}
    return "resnet18", {"small_input": max(shape[-2:]) <= _RESNET_SMALL_INPUT}


# --------------------------------------------------------------------------- building


def split_sha256(parts: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the split's indices (train, val, test), recorded in ``data.json``."""
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(name.encode() + b"|" + np.asarray(parts[name], dtype="<i8").tobytes())
    return h.hexdigest()


def _stat_axes(ndim: int) -> tuple[int, ...] | None:
    """Axes of a (N, ...) array reduced by standardisation (the rest are its features)."""
    if ndim == 2:
        return (0,)
    if ndim == 3:
        return (0, 1)
    return (0, *range(2, ndim))  # images and clips: per channel


def build_features(feature_file: FeatureFile, p: FeaturesParams) -> DatasetBundle:
    """A :class:`DatasetBundle` from the arrays of a features file (or given in Python)."""
    arrays, origin = feature_file.arrays, feature_file.origin
    labels = read_labels(arrays, p.task, origin)
    n = len(labels.targets)
    modalities = []
    for key, value in arrays.items():
        if key in (LABELS, LABEL_NAMES, SPLIT) or key.startswith(MASK_PREFIX):
            continue
        shape = np.shape(value)
        if not MODALITY_NAME.fullmatch(key) or len(shape) not in (2, 3, 4, 5):
            raise DataError(
                f"{origin}: unknown key {key!r} with shape {shape}; a modality is an array "
                "(N, d), (N, L, d), (N, C, H, W) or (N, C, T, H, W) named by letters, digits, "
                "_ or - (not starting with y_ or split_); the other keys are y, y_names, split "
                "and mask_<modality>"
            )
        modalities.append(key)
    for key in arrays:
        if key.startswith(MASK_PREFIX) and key.removeprefix(MASK_PREFIX) not in modalities:
            raise DataError(
                f"{origin}: unknown key {key!r}: there is no modality "
                f"{key.removeprefix(MASK_PREFIX)!r} (modalities: {', '.join(modalities)})"
            )
    modalities.sort()
    if p.modalities is not None:
        unknown = [m for m in p.modalities if m not in modalities]
        if unknown:
            raise DataError(
                f"dataset.modalities names {unknown[0]!r}, which {origin} lacks; its "
                f"modalities: {', '.join(modalities)}"
            )
        modalities = list(p.modalities)
    if len(modalities) < 2:
        raise DataError(
            f"{origin} has {len(modalities)} modality ({', '.join(modalities) or 'none'}); "
            "balancing needs two or more arrays besides y"
        )
    lengths = {k: len(v) for k, v in arrays.items() if k != LABEL_NAMES}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in lengths.items())
        raise DataError(
            f"{origin}: the arrays have different lengths ({listed}); every array needs one "
            "row per sample"
        )
    present = {}
    for m in modalities:
        mask = arrays.get(MASK_PREFIX + m)
        if mask is None:
            present[m] = np.ones(n, dtype=bool)
            continue
        mask = np.asarray(mask)
        if mask.ndim != 1 or mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
            raise DataError(
                f"{origin}: {MASK_PREFIX}{m} must be one true/false (or 1/0) per sample, true "
                "where the modality is missing"
            )
        present[m] = ~mask.astype(bool)
    for m in modalities:
        x = np.asarray(arrays[m])
        _refuse_dtype(x.dtype, f"{origin}: {m}")
        if x.dtype.kind not in "biuf":
            raise DataError(f"{origin}: {m} holds {x.dtype}, not numbers")
        _refuse_non_finite(x, f"{origin}: {m}", present[m])
    parts, split_record = _split(labels, read_split(arrays, origin), p, origin)
    inputs: dict[str, torch.Tensor] = {}
    standardization: dict[str, Any] = {}
    train = parts["train"]
    for m in modalities:
        x = np.array(arrays[m], dtype=np.float32)  # a copy: the file's arrays stay as they are
        absent = ~present[m]
        x[absent] = 0.0
        standardize = (p.standardize == "vectors" and x.ndim == 2) or p.standardize == "all"
        if standardize:
            axes = _stat_axes(x.ndim)
            rows = train[present[m][train]]
            shape = [1 if a in axes else s for a, s in enumerate(x.shape)]
            if len(rows):
                mean = x[rows].astype(np.float64).mean(axis=axes).astype(np.float32)
                std = x[rows].astype(np.float64).std(axis=axes).astype(np.float32)
            else:
                mean = np.zeros(shape[1:], np.float32).reshape(-1)
                std = np.ones_like(mean)
            std = np.where(std > 1e-8, std, np.float32(1.0)).astype(np.float32)
            x = (x - mean.reshape(shape)) / std.reshape(shape)
            x[absent] = 0.0
            standardization[m] = {
                "axes": list(axes),
                "mean": mean.reshape(-1).tolist(),
                "std": std.reshape(-1).tolist(),
            }
        inputs[m] = torch.from_numpy(np.ascontiguousarray(x))
    targets = torch.from_numpy(labels.targets)
    splits = {
        s: MultimodalTensorDataset(
            {m: x[torch.from_numpy(parts[s])] for m, x in inputs.items()},
            targets[torch.from_numpy(parts[s])],
        )
        for s in SPLITS
    }
    specs = {}
    for m in modalities:
        shape = tuple(int(s) for s in inputs[m].shape[1:])
        encoder, params = default_encoder(shape)
        specs[m] = ModalitySpec(m, shape, encoder, params)
    classification = labels.task == "classification"
    details = {
        "source": origin,
        "format": feature_file.format,
        "fingerprint": feature_file.fingerprint,
        "samples": n,
        "labels": [
            {"index": i, "value": v, "name": name}
            for i, (v, name) in enumerate(zip(labels.values, labels.names, strict=True))
        ],
        "split": split_record,
        "missing": {m: int((~present[m]).sum()) for m in modalities},
        "standardization": standardization,
    }
    return DatasetBundle(
        name="features",
        task=labels.task,
        num_outputs=len(labels.values) if classification else 1,
        modalities=specs,
        splits=splits,
        class_names=labels.names if classification else None,
        notes=(
            f"features from {origin} ({feature_file.format}, sha256 "
            f"{feature_file.fingerprint[:12]}); {split_record['how']}"
        ),
        details=details,
    )


def _split(
    labels: Labels, given: np.ndarray | None, p: FeaturesParams, origin: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train/val/test indices (each sorted) and their record for ``data.json``."""
    classification = labels.task == "classification"
    strata = torch.from_numpy(labels.targets if classification else np.zeros(len(labels.targets)))
    train_fraction = 1 - p.val_fraction - p.test_fraction

    def check_counts(index: np.ndarray, fractions: list[float], what: str) -> None:
        if not classification:
            need = _min_per_class(fractions)
            if len(index) < need:
                raise DataError(
                    f"{origin}: {len(index)} samples are too few for {what}; it needs "
                    f"{need} or more"
                )
            return
        need = _min_per_class(fractions)
        counts = np.bincount(labels.targets[index], minlength=len(labels.values))
        small = int(np.argmin(counts))
        if counts[small] < need:
            raise DataError(
                f"{origin}: class {labels.names[small]!r} has {int(counts[small])} samples"
                f"{' in the train split' if given is not None else ''}, but {what} needs "
                f"{need} or more of each class; add samples, merge classes or change "
                "dataset.val_fraction / dataset.test_fraction"
            )

    if given is None:
        fractions = [train_fraction, p.val_fraction, p.test_fraction]
        check_counts(
            np.arange(len(strata)),
            fractions,
            f"a split with val_fraction={p.val_fraction} and test_fraction={p.test_fraction}",
        )
        tr, va, te = (t.numpy() for t in stratified_split(strata, fractions, p.split_seed))
        how = (
            f"{'stratified ' if classification else ''}split {train_fraction:.2f}/"
            f"{p.val_fraction:.2f}/{p.test_fraction:.2f} with split_seed {p.split_seed}"
        )
    else:
        tr, va, te = (np.nonzero(given == k)[0] for k in range(3))
        for name, index in (("train", tr), ("test", te)):
            if not len(index):
                raise DataError(f"{origin}: split marks no {name} samples")
        how = "the file's split"
        if not len(va):
            share = p.val_fraction / (1 - p.test_fraction)
            fractions = [1 - share, share]
            check_counts(tr, fractions, f"carving validation ({share:.2f} of train)")
            keep, carved = stratified_split(strata[tr], fractions, p.split_seed)
            tr, va = tr[keep.numpy()], tr[carved.numpy()]
            how += f", validation carved from train ({share:.2f}, split_seed {p.split_seed})"
        elif classification:
            missing = np.setdiff1d(np.arange(len(labels.values)), labels.targets[tr])
            if len(missing):
                raise DataError(
                    f"{origin}: class {labels.names[int(missing[0])]!r} has no sample in the "
                    "train split"
                )
    parts = {"train": np.sort(tr), "val": np.sort(va), "test": np.sort(te)}
    record = {
        "how": how,
        "sizes": {s: len(parts[s]) for s in SPLITS},
        "sha256": split_sha256(parts),
    }
    if classification:
        record["class_counts"] = {
            s: np.bincount(labels.targets[parts[s]], minlength=len(labels.values)).tolist()
            for s in SPLITS
        }
    return parts, record


@DATASETS.register("features")
class FeaturesSource(DatasetSource):
    """Your precomputed per-modality features: an .npz, a .safetensors or a directory of .npy
    files with one array per modality, y, and optionally split and mask_<modality>."""

    Params = FeaturesParams
    description = (
        "your per-modality features: .npz / .safetensors / .npy directory with one array per "
        "modality and y (`mmbalance list features`)"
    )
    guide: ClassVar[tuple[str, ...]] = (
        "Keys: one array per modality, named by its key; y (labels: integers or text, or "
        "floats for regression); optional y_names (y_names[k] names label k), split "
        "(train/val/test or 0/1/2) and mask_<modality> (true where it is missing).",
        "Encoders by shape: (N, d) mlp; (N, L, d) sequence_transformer; (N, C, H, W) and "
        "(N, C, T, H, W) resnet18 (small-input stem up to 64 px); override with "
        "encoder.<modality>=NAME.",
        "Without a split array: a stratified split by dataset.val_fraction, test_fraction and "
        "split_seed, the same for every method and seed; the run's data.json records it, the "
        "label mapping and the standardisation (training statistics only).",
        "Files are read without pickle: object arrays and pickles are refused.",
    )
    train_defaults = {"optimizer": "adam", "lr": 1e-3, "epochs": 20, "batch_size": 64}

    def fingerprint(self) -> str | None:
        """The SHA-256 of the file (of every ``.npy`` file of a directory)."""
        p: FeaturesParams = self.params
        path = Path(p.path).expanduser() if p.path else None
        if path is None or not path.exists():
            return None
        if path.is_dir():
            return _read_npy_dir_digest(path)
        return file_sha256(path)

    def build(self) -> DatasetBundle:
        p: FeaturesParams = self.params
        if not p.path:
            raise DataError(
                "dataset.path is not set; point it at an .npz, a .safetensors or a directory "
                "of .npy files (`mmbalance list features`)"
            )
        return build_features(read_feature_file(p.path), p)
