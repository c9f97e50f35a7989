"""``manifest``: your image, audio and video files with a label table.

``dataset.path`` is a CSV (or TSV: ``.tsv``, or tabs in the header) with a header row:

* one column per modality holding a file path relative to the table's directory: images
  (``.png``, ``.jpg``, ``.jpeg``), audio (``.wav``, ``.flac``, ``.ogg``) or video (``.mp4``,
  ``.avi``, ``.mkv``, ``.webm``, ``.mov``); a column's kind is read from its files' suffixes;
* the label column (``dataset.label_column``, default ``label``): integer or text classes, or
  numbers for regression (``dataset.task``), mapped as the ``features`` dataset maps ``y``;
* optionally a split column (``dataset.split_column``, default ``split``): ``train``/``val``/
  ``test`` or 0/1/2 (one sample in two splits, by its files or by their decoded content, is
  refused); without it, the stratified split of the ``features`` dataset (``val_fraction``,
  ``test_fraction``, ``split_seed``), recorded in ``data.json``.

Files decode through the prepared clip datasets' pipeline (:mod:`mmbalance.data.clips`): audio
(a WAV directly, other formats through PyAV) becomes the Kaldi-style fbank of Kinetics-Sounds
and AVE (``dataset.audio=fbank``, ``fbank_frames`` 10 ms frames) or OGM-GE's log-STFT of CREMA-D
(``stft``, ``audio_seconds``), ``(1, F, T)``; images are resized to ``image_size`` squared,
``(3, s, s)``; videos give ``frames`` frames at the centres of equal segments, ``(3, T, s, s)``;
images and frames are ImageNet-normalised, as the clip datasets' frames are. Every modality
gets ``resnet18`` (a spectrogram is a one-channel image; small-input stem up to 64 pixels).

The decoded arrays are cached like ``mmbalance prepare``'s (:func:`~mmbalance.data.cache.
cached_arrays`, verified by a content hash), keyed by the table's SHA-256, every file's size and
modification time, and the decoding options: a second run decodes nothing, and a changed file
is decoded again.

Paths follow the prepared datasets' rule: each must resolve (symlinks followed) inside the
table's directory, so a table from elsewhere cannot make a run read any other file; an absolute
path or one with control characters is refused too. A missing or undecodable file is a one-line
error naming its row and column, unless ``dataset.skip_bad=true``, which skips those rows,
counts them in the notes and lists them in ``data.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from mmbalance.config import check
from mmbalance.data.base import DATASETS, DatasetSource
from mmbalance.data.cache import cached_arrays, content_hash
from mmbalance.data.clips import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIDEO_SUFFIXES,
    check_disjoint_splits,
    content_ids,
    decode_frames_at,
    fbank_features,
    inside,
    read_audio_track,
    read_images,
    read_wav,
    stft_features,
)
from mmbalance.data.features import (
    SPLIT_VALUES,
    SPLITS,
    FeatureFile,
    FeaturesParams,
    build_features,
)
from mmbalance.errors import DataError
from mmbalance.io import open_regular

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
#: Bumped whenever decoding changes in a way the options do not capture.
VERSION = 1


@dataclass
class ManifestParams:
    """Options of the manifest dataset.

    Attributes:
        path: the CSV or TSV table; file paths in it are relative to its directory.
        label_column: the column holding the labels.
        split_column: the column holding train/val/test (or 0/1/2), used when the table has
            it; without it, a stratified split by val_fraction, test_fraction and split_seed.
        modalities: the columns that hold files, in this order (null: every column but the
            label and split columns).
        task: auto (integer or text labels: classification; fractional numbers: regression),
            classification or regression.
        audio: the audio features: fbank (Kaldi-style, 128 bins, as Kinetics-Sounds and AVE)
            or stft (OGM-GE's log-STFT at 22.05 kHz, as CREMA-D).
        fbank_frames: fbank length in 10 ms frames (audio=fbank).
        audio_seconds: seconds of audio the STFT covers, the sound tiled if shorter
            (audio=stft).
        image_size: side of the square images and video frames, in pixels.
        frames: frames sampled per video, at the centres of equal segments.
        skip_bad: skip (and count) the rows whose file is missing or does not decode, instead
            of stopping at the first.
        val_fraction: share of the samples in the validation split (without a split column).
        test_fraction: share of the samples in the test split (without a split column).
        split_seed: seed of the stratified split.
    """

    path: str | None = None
    label_column: str = "label"
    split_column: str = "split"
    modalities: list[str] | None = None
    task: Literal["auto", "classification", "regression"] = "auto"
    audio: Literal["fbank", "stft"] = "fbank"
    fbank_frames: int = 300
    audio_seconds: float = 3.0
    image_size: int = 64
    frames: int = 3
    skip_bad: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0

    def __post_init__(self) -> None:
        check(self.fbank_frames >= 1, "dataset.fbank_frames must be >= 1")
        check(self.audio_seconds > 0, "dataset.audio_seconds must be > 0")
        check(8 <= self.image_size <= 1024, "dataset.image_size must be in [8, 1024]")
        check(self.frames >= 1, "dataset.frames must be >= 1")
        FeaturesParams(
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            split_seed=self.split_seed,
        )  # the same checks


def _kind(suffix: str) -> str | None:
    suffix = suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV or TSV table, or a one-line :class:`DataError`."""
    if not path.exists():
        raise DataError(f"{path} does not exist; set dataset.path to your CSV or TSV table")
    try:
        with open_regular(path) as fh:  # a FIFO would hang the read
            text = fh.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__})") from None
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
    try:
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    except csv.Error as err:
        raise DataError(f"{path} is not a readable table ({err})") from None
    if not rows:
        raise DataError(f"{path} has no rows below its header")
    for n, row in enumerate(rows, 2):
        if None in row or None in row.values():
            raise DataError(f"{path}:{n} does not have one value per column of the header")
    return header, rows


def _labels(values: list[str]) -> np.ndarray:
    """A label column as integers, floats or text (as the ``features`` dataset reads ``y``)."""
    stripped = [v.strip() for v in values]
    try:
        return np.array([int(v) for v in stripped], dtype=np.int64)
    except ValueError:
        pass
    try:
        return np.array([float(v) for v in stripped], dtype=np.float64)
    except ValueError:
        return np.array(stripped)


def resolve_file(root: Path, value: str, where: str) -> Path:
    """The file a table cell names, confined to the table's directory ``root`` (resolved)."""
    if not value or any(ord(c) < 32 for c in value) or Path(value).is_absolute():
        raise DataError(
            f"{where}: {value!r} is not a relative path inside the table's directory; fix or "
            "remove that row"
        )
    try:
        return inside(root, root / value, f"fix {where}")
    except DataError:
        raise DataError(
            f"{where}: {value!r} resolves to {(root / value).resolve()}, outside the table's "
            f"directory {root}; a table may name only files under its own directory"
        ) from None


def _check_disjoint(
    table: Path,
    root: Path,
    columns: list[str],
    files: list[dict[str, Path]],
    decoded: dict[str, torch.Tensor],
    feature_arrays: dict[str, Any],
) -> None:
    """Refuse, in one line, a table whose split column puts one sample in two splits: the same
    files (resolved paths) or the same decoded content on rows of different splits."""
    values = {**SPLIT_VALUES, "0": 0, "1": 1, "2": 2}
    codes = np.array([values.get(str(w).lower(), -1) for w in feature_arrays["split"]])
    index = {}
    for code, name in enumerate(SPLITS):  # (other values are refused by build_features)
        positions = np.flatnonzero(codes == code)
        if len(positions):
            index[name] = torch.from_numpy(positions)
    samples = [
        {"clip": " + ".join(str(f[c].resolve().relative_to(root)) for c in columns)} for f in files
    ]
    ids = content_ids({c: decoded[f"x_{c}"].numpy() for c in columns})
    check_disjoint_splits(samples, index, ids, str(table))


def _decode(kind: str, path: Path, p: ManifestParams) -> np.ndarray:
    if kind == "image":
        return read_images([path], p.image_size)[0]  # (s, s, 3) uint8
    if kind == "video":
        return decode_frames_at(path, p.image_size, p.frames)  # (T, s, s, 3) uint8
    wave, sr = read_wav(path) if path.suffix.lower() == ".wav" else read_audio_track(path)
    if p.audio == "stft":
        return stft_features(wave, sr, p.audio_seconds)[None]  # (1, 257, T)
    return fbank_features(wave, sr, p.fbank_frames).T[None]  # (1, 128, T)


def _normalised(kind: str, array: torch.Tensor) -> torch.Tensor:
    """Decoded arrays as the model's float tensors: images ``(N, 3, s, s)``, clips
    ``(N, 3, T, s, s)`` ImageNet-normalised; spectrograms as they are."""
    if kind == "audio":
        return array.float()
    x = array.float() / 255.0
    if kind == "image":
        x = x.permute(0, 3, 1, 2)
        shape = (1, 3, 1, 1)
    else:
        x = x.permute(0, 4, 1, 2, 3)
        shape = (1, 3, 1, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(shape)
    std = torch.tensor(IMAGENET_STD).view(shape)
    return ((x - mean) / std).contiguous()


@dataclass
class _Scan:
    table: Path
    header: list[str]
    rows: list[dict[str, str]]
    columns: list[str]
    kinds: dict[str, str]
    files: list[dict[str, Path]]
    table_hash: str
    recipe: dict[str, Any]


@DATASETS.register("manifest")
class ManifestSource(DatasetSource):
    """Your image, audio and video files named by a CSV/TSV table with a label column."""

    Params = ManifestParams
    description = (
        "your files (images, audio, video) listed in a CSV/TSV table with a label column, "
        "decoded like the prepared clip datasets and cached"
    )
    guide: ClassVar[tuple[str, ...]] = (
        "Columns: one per modality with a file path relative to the table (png/jpg, "
        "wav/flac/ogg, mp4/avi/...), the label column and optionally the split column.",
        "Audio: fbank (dataset.fbank_frames) or stft (dataset.audio_seconds); images and "
        "video frames: dataset.image_size, dataset.frames; every modality gets resnet18.",
        "Paths must stay inside the table's directory; a missing or undecodable file stops "
        "the run with its row unless dataset.skip_bad=true.",
    )
    train_defaults = {"optimizer": "adam", "lr": 1e-3, "epochs": 20, "batch_size": 32}

    def _scan(self) -> _Scan:
        """The table, its files (checked to lie inside its directory) and the cache recipe."""
        p: ManifestParams = self.params
        if not p.path:
            raise DataError(
                "dataset.path is not set; point it at a CSV or TSV table of file paths and "
                "labels (`mmbalance list manifest`)"
            )
        table = Path(p.path).expanduser()
        header, rows = read_table(table)
        root = table.parent.resolve()
        if p.label_column not in header:
            raise DataError(
                f"{table} has no label column {p.label_column!r} (columns: {', '.join(header)}); "
                "set dataset.label_column"
            )
        others = [c for c in header if c not in (p.label_column, p.split_column)]
        columns = list(p.modalities) if p.modalities is not None else others
        unknown = [c for c in columns if c not in header]
        if unknown:
            raise DataError(f"dataset.modalities names {unknown[0]!r}, which {table} lacks")
        kinds: dict[str, str] = {}
        files: list[dict[str, Path]] = []
        for n, row in enumerate(rows, 2):
            resolved = {}
            for column in columns:
                where = f"{table}:{n} (column {column})"
                kind = _kind(Path(row[column]).suffix)
                if kind is None:
                    raise DataError(
                        f"{where}: {row[column]!r} is no image (png, jpg), audio (wav, flac, "
                        "ogg) or video (mp4, avi, mkv, webm, mov) file"
                    )
                if kinds.setdefault(column, kind) != kind:
                    raise DataError(f"{where}: a {kind} file in a column of {kinds[column]} files")
                resolved[column] = resolve_file(root, row[column], where)
            files.append(resolved)
        with open_regular(table) as fh:
            table_hash = hashlib.sha256(fh.read()).hexdigest()
        stats = []
        for n, resolved in enumerate(files, 2):
            for column in columns:
                try:
                    st = resolved[column].stat()
                except OSError:
                    stats.append(None)
                    continue
                if not S_ISREG(st.st_mode):  # a FIFO would hang the decoder
                    raise DataError(
                        f"{table}:{n} (column {column}): {rows[n - 2][column]!r} is not a "
                        "regular file; mmbalance reads only files"
                    )
                stats.append([st.st_size, st.st_mtime_ns])
        options = {k: v for k, v in asdict(p).items() if k not in ("path", "val_fraction",
                   "test_fraction", "split_seed", "task")}  # fmt: skip
        recipe = {
            "version": VERSION,
            "table": table_hash,
            "files": hashlib.sha256(repr(stats).encode()).hexdigest(),
            "options": options,
        }
        return _Scan(table, header, rows, columns, kinds, files, table_hash, recipe)

    def fingerprint(self) -> str | None:
        """SHA-256 of the cache recipe: the table's SHA-256, every file's size and modification
        time, and the decoding options (None when the table is not readable yet)."""
        try:
            recipe = self._scan().recipe
        except DataError:
            return None
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

    def build(self) -> Any:
        p: ManifestParams = self.params
        scan = self._scan()
        table, header, rows, columns = scan.table, scan.header, scan.rows, scan.columns
        kinds, files, table_hash, recipe = scan.kinds, scan.files, scan.table_hash, scan.recipe

        def decode_all() -> dict[str, torch.Tensor]:
            decoded: dict[str, list[np.ndarray]] = {c: [] for c in columns}
            kept, bad = [], []
            for i, resolved in enumerate(files):
                try:
                    values = {}
                    for column in columns:
                        where = f"{table}:{i + 2} (column {column})"
                        try:
                            values[column] = _decode(kinds[column], resolved[column], p)
                        except Exception as err:
                            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
                            raise DataError(
                                f"{where}: {rows[i][column]!r} cannot be decoded "
                                f"({type(err).__name__}{': ' + text if text else ''})"
                            ) from None
                except DataError as err:
                    if not p.skip_bad:
                        raise DataError(
                            f"{err}; fix or remove that row, or set dataset.skip_bad=true to "
                            "skip such rows"
                        ) from None
                    bad.append(i)
                    log.warning("skipped %s", err)
                    continue
                kept.append(i)
                for column, value in values.items():
                    decoded[column].append(value)
            if not kept:
                raise DataError(f"{table}: no row could be decoded")
            out = {f"x_{c}": torch.from_numpy(np.stack(decoded[c])) for c in columns}
            out["rows"] = torch.tensor(kept, dtype=torch.long)
            out["bad_rows"] = torch.tensor(bad, dtype=torch.long)
            return out

        arrays = cached_arrays(self.cache_dir, "manifest", recipe, decode_all)
        kept = arrays["rows"].numpy()
        bad = arrays["bad_rows"].numpy().tolist()
        feature_arrays: dict[str, Any] = {
            c: _normalised(kinds[c], arrays[f"x_{c}"]).numpy() for c in columns
        }
        feature_arrays["y"] = _labels([rows[i][p.label_column] for i in kept])
        if p.split_column in header:
            feature_arrays["split"] = np.array([rows[i][p.split_column].strip() for i in kept])
            if feature_arrays["split"].dtype.kind == "U" and all(
                s.isdigit() for s in feature_arrays["split"]
            ):
                feature_arrays["split"] = feature_arrays["split"].astype(np.int64)
            _check_disjoint(
                table,
                table.parent.resolve(),
                columns,
                [files[i] for i in kept],
                arrays,
                feature_arrays,
            )
        fingerprint = hashlib.sha256(
            (table_hash + content_hash({k: v for k, v in arrays.items()})).encode()
        ).hexdigest()
        params = FeaturesParams(
            path=str(table),
            task=p.task,
            modalities=columns,
            val_fraction=p.val_fraction,
            test_fraction=p.test_fraction,
            split_seed=p.split_seed,
            standardize="none",
        )
        bundle = build_features(
            FeatureFile(feature_arrays, str(table), fingerprint, "manifest"), params
        )
        bundle.name = "manifest"
        for column in columns:
            spec = bundle.modalities[column]
            size = spec.shape[-1]
            bundle.modalities[column] = type(spec)(
                column, spec.shape, "resnet18", {"small_input": size <= 64}
            )
        bundle.details["kinds"] = kinds
        bundle.details["skipped_rows"] = [int(i) + 2 for i in bad]
        if bad:
            bundle.notes += f"; {len(bad)} row(s) skipped as undecodable (dataset.skip_bad)"
        bundle.notes = bundle.notes.replace("features from", "files of", 1)
        return bundle
