"""``kinetics_sounds``: Kinetics-Sounds (31 classes of Kinetics with audible actions).

Two steps, as for CREMA-D (see :mod:`mmbalance.data.clips`):

1. ``prepare`` (``mmbalance prepare kinetics_sounds --raw DIR --out DIR``) reads the layout
   of the OGM-GE / BalanceBenchmark releases. The split comes from lists or from folders:

   * lists: ``train.txt`` and ``test.txt`` (also accepted under OGM-GE's names ``my_train.txt`` /
     ``my_test.txt`` or ``ks_train_overlap.txt`` / ``ks_test_overlap.txt``), optional
     ``val.txt``; space-separated lines whose first token is the clip id and whose last token is
     the integer label 0..30. Optional ``classes.txt``: the 31 class names in label order.
   * per-split folders (no list files): ``videos/<train|val|test>/<class name>/<id>.mp4``;
     the classes are the sorted class-folder names.

   The media of a clip may be a video anywhere under ``videos/`` (e.g. per-split folders; the
   sound is taken from its audio track and frames are decoded at 1 fps), or a pre-extracted
   ``audio/<id>.wav`` plus a 1-fps frame folder ``frames/<id>/*.jpg`` (BalanceBenchmark's
   ``frame_0000t.jpg``); extracted files win over the video. Per clip it writes
   ``audio_fbank/<id>.npy`` (the 128 x ``fbank_frames`` fbank of OGM-GE's ``process_audio.py``,
   the maintainers' KS recipe), ``audio_stft/<id>.npy`` (log-STFT of 10 s, ``(257, 625)``) and
   ``frames/<id>.npy`` (1 fps, ``(T, s, s, 3)`` uint8). Idempotent and resumable; unreadable or
   missing files are skipped and listed in the report and ``prepare_report.json``.

2. The dataset source loads the prepared directory (``dataset.root``). The OGM-GE lists have no
   validation split: unless ``val.txt`` (or a ``val`` folder) was given, a stratified
   ``dataset.val_fraction`` of the training clips is carved out with ``dataset.seed`` (0 by
   default), and the bundle's ``notes`` say so. (BML's ``KS_train_val.json`` has a 1,320-clip
   validation split; write its ids to ``val.txt`` to use it.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmbalance.data import clips
from mmbalance.data.base import DATASETS
from mmbalance.errors import DataError
from mmbalance.io import read_text

NUM_CLASSES = 31
LIST_NAMES = {
    "train": ("train.txt", "my_train.txt", "ks_train_overlap.txt"),
    "val": ("val.txt", "my_val.txt", "ks_val_overlap.txt"),
    "test": ("test.txt", "my_test.txt", "ks_test_overlap.txt"),
}
SECONDS = 10.0


def _read_lists(raw: Path) -> dict[str, tuple[int, str]]:
    """``clip -> (label, split)`` from the split lists present in ``raw``."""
    found: dict[str, tuple[int, str]] = {}
    for split, names in LIST_NAMES.items():
        path = next((raw / n for n in names if (raw / n).exists()), None)
        if path is None:
            continue
        for n, line in enumerate(read_text(path, errors="replace").splitlines(), 1):
            tokens = line.replace(",", " ").split()
            if not tokens:
                continue
            if len(tokens) < 2 or not re.fullmatch(r"\d+", tokens[-1]):
                raise DataError(f"{path}:{n} is not '<clip id> ... <integer label>'")
            clip = clips.check_clip_name(tokens[0], f"{path}:{n}")
            found.setdefault(clip, (int(tokens[-1]), split))
    return found


def _class_names(raw: Path) -> list[str]:
    path = raw / "classes.txt"
    if path.exists():
        names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
        if len(names) != NUM_CLASSES:
            raise DataError(f"{path} lists {len(names)} classes, expected {NUM_CLASSES}")
        return names
    return [str(k) for k in range(NUM_CLASSES)]


@dataclass
class KineticsSoundsParams(clips.AudioVisualParams):
    """Options of Kinetics-Sounds (a prepared directory; see ``prepare``)."""

    audio: Literal["stft", "fbank"] = "fbank"


@DATASETS.register("kinetics_sounds")
class KineticsSoundsSource(clips.AudioVisualSource):
    Params = KineticsSoundsParams
    name = "kinetics_sounds"
    title = "Kinetics-Sounds"
    seconds = SECONDS
    description = "Kinetics-Sounds (31): audio fbank + frames, from `mmbalance prepare`"
    # The TPAMI 2024 (OPM/OGM) KS setting; the config files have the rest.
    train_defaults = {"optimizer": "adamw", "lr": 5e-5, "weight_decay": 0.01, "batch_size": 32}

    @classmethod
    def find_clips(
        cls, raw: Path, out: Path, params: clips.AudioVisualPrepareParams
    ) -> clips.Release:
        """The clips of the split lists (or of per-split class folders), each with a video or
        with a WAV file plus a frame folder."""
        videos = clips.index_files(raw / "videos", clips.VIDEO_SUFFIXES)
        wavs = clips.index_files(raw / "audio", (".wav",))
        frame_dirs = clips.index_frame_dirs(raw / "frames")
        lists = _read_lists(raw)
        failed: dict[str, str] = {}
        if lists:
            classes = _class_names(raw)
            labels: dict[str, str] = {}
            splits: dict[str, str] = {}
            for clip, (k, split) in lists.items():
                splits[clip] = split
                if k >= len(classes):
                    failed[clip] = f"label {k} outside 0..{len(classes) - 1}"
                else:
                    labels[clip] = classes[k]
        else:  # per-split folders videos/<split>/<class>/<id>.mp4
            folders = {
                c: p for c, p in videos.items() if p.parent.parent.name in ("train", "val", "test")
            }
            classes = sorted({p.parent.name for p in folders.values()})
            labels = {c: p.parent.name for c, p in folders.items()}
            splits = {c: p.parent.parent.name for c, p in folders.items()}
        names = sorted(splits)
        if not names:
            raise DataError(
                f"{raw} holds no split lists (train.txt/test.txt, my_train.txt/my_test.txt) and "
                "no videos/<train|test>/<class>/ folders; pass the root of the Kinetics-Sounds data"
            )
        for clip in names:
            if clip in failed:
                continue
            if clip not in videos and clip not in wavs:
                failed[clip] = (
                    f"missing audio file audio/{clip}.wav (and no video videos/**/{clip}.*)"
                )
            elif clip not in videos and clip not in frame_dirs:
                failed[clip] = f"missing frames frames/{clip}/ (and no video videos/**/{clip}.*)"
        return clips.Release(
            names=names,
            failed=failed,
            label=lambda c: labels[c],
            split=lambda c: splits[c],
            job=cls.av_job(
                raw, out, params, lambda c: (videos.get(c), wavs.get(c), frame_dirs.get(c))
            ),
            classes=classes,
        )
