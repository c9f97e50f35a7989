"""``ave``: AVE, the Audio-Visual Event dataset (28 event classes, 10 s YouTube clips).

Two steps, as for CREMA-D (see :mod:`mmbalance.data.clips`):

1. ``prepare`` (``mmbalance prepare ave --raw DIR --out DIR``) reads the community layout
   of the release (``AVE_Dataset/``):

   * ``AVE/<VideoID>.mp4``: the 4,143 videos, with their sound;
   * ``trainSet.txt``, ``valSet.txt``, ``testSet.txt``: the official split (3,339 / 402 / 402),
     one ``Category&VideoID&Quality&StartTime&EndTime`` line per video (a header line is
     skipped). ``Annotations.txt`` holds all videos in the same format and is not needed.

   Per clip it writes the sound of the whole 10 s video in both recipes of the OGM-GE family,
   ``audio_stft/<id>.npy`` (22.05 kHz, STFT 512/353, ``log(|S| + 1e-7)``: ``(257, 625)``) and
   ``audio_fbank/<id>.npy`` (128-bin fbank, ``(fbank_frames, 128)``), and ``frames/<id>.npy``,
   the video at 1 fps (``(10, s, s, 3)`` uint8). The event's start and end times are for
   localisation; classification uses the whole clip, as the balancing papers do. A clip whose
   files exist is skipped (idempotent, resumable); unreadable videos, videos without sound and
   missing videos are skipped and listed in the report and ``prepare_report.json``.

2. The dataset source loads the prepared directory (``dataset.root``) with the official
   train / val / test split; ``dataset.frames`` frames per clip (segment centres of the 1-fps
   frames; MCR uses 4, OGM-GE 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmbalance.data import clips
from mmbalance.data.base import DATASETS
from mmbalance.errors import DataError
from mmbalance.io import read_text

#: The 28 categories in the order of the AVE code (YapengTian/AVE-ECCV18), which fixes labels.
CLASSES = (
    "Church bell",
    "Male speech, man speaking",
    "Bark",
    "Fixed-wing aircraft, airplane",
    "Race car, auto racing",
    "Female speech, woman speaking",
    "Helicopter",
    "Violin, fiddle",
    "Flute",
    "Ukulele",
    "Frying (food)",
    "Truck",
    "Shofar",
    "Motorcycle",
    "Acoustic guitar",
    "Train horn",
    "Clock",
    "Banjo",
    "Goat",
    "Baby cry, infant cry",
    "Bus",
    "Chainsaw",
    "Cat",
    "Horse",
    "Toilet flush",
    "Rodents, rats, mice",
    "Accordion",
    "Mandolin",
)
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
SECONDS = 10.0


def read_split_files(raw: Path) -> dict[str, tuple[str, str]]:
    """``video id -> (category, split)`` from the official split files present in ``raw``."""
    found: dict[str, tuple[str, str]] = {}
    for split, name in SPLIT_FILES.items():
        path = raw / name
        if not path.exists():
            continue
        for n, line in enumerate(read_text(path, errors="replace").splitlines(), 1):
            parts = [p.strip() for p in line.split("&")]
            if not line.strip() or parts[0] == "Category":
                continue
            if len(parts) < 2 or not parts[1]:
                raise DataError(f"{path}:{n} is not Category&VideoID&Quality&StartTime&EndTime")
            found.setdefault(clips.check_clip_name(parts[1], f"{path}:{n}"), (parts[0], split))
    return found


@dataclass
class AveParams(clips.AudioVisualParams):
    """Options of AVE (a prepared directory; see ``prepare``). ``val_fraction`` is only used if
    a prepared directory lacks the official val split."""

    frames: int = 4


@DATASETS.register("ave")
class AveSource(clips.AudioVisualSource):
    Params = AveParams
    name = "ave"
    title = "AVE"
    raw_hint = "AVE_Dataset"
    classes = CLASSES
    seconds = SECONDS
    description = (
        "AVE audio-visual events (28): audio spectrogram + frames, from `mmbalance prepare`"
    )
    # MCR's AVE ResNet run (Adam 1e-4, wd 1e-4, batch 32); the config file has the rest.
    train_defaults = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 32}

    @classmethod
    def find_clips(
        cls, raw: Path, out: Path, params: clips.AudioVisualPrepareParams
    ) -> clips.Release:
        """The clips of the official split files, each with its video ``AVE/<id>.mp4``."""
        listed = read_split_files(raw)
        if not listed:
            raise DataError(
                f"{raw} holds no trainSet.txt, valSet.txt or testSet.txt; "
                "pass the root of the AVE release (AVE_Dataset/)"
            )
        videos = clips.index_files(raw / "AVE", clips.VIDEO_SUFFIXES)
        failed: dict[str, str] = {}
        for clip, (category, _) in listed.items():
            if category not in CLASSES:
                failed[clip] = f"unknown AVE category {category!r}"
            elif clip not in videos:
                failed[clip] = f"missing video file AVE/{clip}.mp4"
        return clips.Release(
            names=sorted(listed),
            failed=failed,
            label=lambda c: listed[c][0],
            split=lambda c: listed[c][1],
            job=cls.av_job(raw, out, params, lambda c: (videos[c], None, None)),
        )
