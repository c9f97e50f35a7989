"""``cremad``: CREMA-D (6 emotions, audio + face video) from a directory made by ``prepare``.

Two steps, because decoding 7,442 videos takes a while and is done once:

1. ``prepare`` (``mmbalance prepare cremad --raw DIR --out DIR``) reads the raw release
   (``AudioWAV/<clip>.wav`` and ``VideoFlash/<clip>.flv`` or ``.mp4``) and writes, per clip,
   both audio recipes and the frames as ``.npy`` files plus ``manifest.csv``:

   * ``audio_stft/<clip>.npy``: the OGM-GE recipe. Resample to 22.05 kHz, tile to exactly 3 s,
     clip to [-1, 1], STFT n_fft 512 / hop 353, ``log(|S| + 1e-7)``: ``(257, 188)`` float32.
   * ``audio_fbank/<clip>.npy``: the Kaldi-style recipe OGM-GE ships for Kinetics-Sounds.
     16 kHz, 128 mel bins, 25 ms frames, 10 ms shift, cut or zero-padded to ``fbank_frames``
     (1024 in that script), normalised as ``(x + 4.503877) / (2 * 5.141276)``:
     ``(fbank_frames, 128)`` float32. The window is Kaldi's symmetric Hann (``hanning``), as in
     the reference script.
   * ``frames/<clip>.npy``: the video decoded at 1 fps (the first frame of every second),
     resized to ``image_size`` squared: ``(T, image_size, image_size, 3)`` uint8.

   A clip whose three files exist is skipped, so a second run does nothing and an interrupted
   run resumes; files are written under a temporary name and renamed, so a crash never leaves a
   half-written one. Unreadable or missing files are skipped and listed in the final report and
   in ``prepare_report.json``. If the raw directory holds the OGM-GE split files ``train.csv``
   and ``test.csv`` (``clip,EMO`` rows), the manifest records each clip's split.

2. The dataset source loads the prepared directory (``dataset.root``) through the shared clip
   pipeline (:class:`mmbalance.data.clips.AudioVisualSource`): frames stay uint8 in the
   memory-mapped cache and are normalised a batch at a time. The community split has no
   validation set: one is carved from the training clips (stratified, ``dataset.seed``), and
   the bundle's ``notes`` say so. Without split files, a stratified test split
   (``dataset.test_fraction``) is carved too.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from mmbalance.config import check
from mmbalance.data import clips
from mmbalance.data.base import DATASETS
from mmbalance.errors import DataError
from mmbalance.io import read_text

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
VIDEO_SUFFIXES = (".flv", ".mp4")


def clip_label(clip: str) -> str:
    """The emotion code of a CREMA-D clip name ``<actor>_<sentence>_<EMO>_<level>``."""
    parts = clip.split("_")
    if len(parts) < 3 or parts[2] not in EMOTIONS:
        raise DataError(f"clip name {clip!r} does not follow ACTOR_SENTENCE_EMO_LEVEL")
    return parts[2]


def read_split_files(raw: Path) -> dict[str, str]:
    """``clip -> train|test`` from OGM-GE's ``train.csv`` / ``test.csv``, if present."""
    splits: dict[str, str] = {}
    for split in ("train", "test"):
        path = raw / f"{split}.csv"
        if not path.exists():
            continue
        with io.StringIO(read_text(path, errors="replace"), newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if row and row[0].strip() and row[0].strip().lower() != "clip":
                    splits[clips.check_clip_name(row[0].strip(), f"{path}:{n}")] = split
    return splits


@dataclass
class CremadParams(clips.AudioVisualParams):
    """Options of CREMA-D (a prepared directory; see ``prepare``).

    Attributes:
        test_fraction: share of the clips drawn for testing when the prepared directory has no
            train/test split files.
    """

    frames: int = 1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            0 < self.test_fraction < 0.5,
            f"dataset.test_fraction must be in (0, 0.5), got {self.test_fraction}",
        )


@DATASETS.register("cremad")
class CremadSource(clips.AudioVisualSource):
    Params = CremadParams
    name = "cremad"
    title = "CREMA-D"
    classes = EMOTIONS
    seconds = clips.STFT_SECONDS
    description = "CREMA-D emotions (6): audio spectrogram + face frames, from `mmbalance prepare`"
    # OGM-GE's CVPR setting (SGD 1e-3, momentum 0.9, wd 1e-4, batch 64, 100 epochs).
    train_defaults = {
        "optimizer": "sgd",
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "epochs": 100,
    }

    @classmethod
    def find_clips(
        cls, raw: Path, out: Path, params: clips.AudioVisualPrepareParams
    ) -> clips.Release:
        """Clips are the stems of ``AudioWAV/*.wav`` and ``VideoFlash/*.flv|*.mp4``; both files
        are needed (the sound comes from the WAV, the frames from the video)."""
        wavs = {p.stem: p for p in sorted((raw / "AudioWAV").glob("*.wav"))}
        videos: dict[str, Path] = {}
        for suffix in VIDEO_SUFFIXES:
            for p in sorted((raw / "VideoFlash").glob(f"*{suffix}")):
                videos.setdefault(p.stem, p)
        names = sorted(set(wavs) | set(videos))
        if not names:
            raise DataError(
                f"{raw} holds no AudioWAV/*.wav or VideoFlash/*.flv|*.mp4 files; "
                "pass the root of the CREMA-D release"
            )
        failed: dict[str, str] = {}
        for clip in names:
            try:
                clip_label(clip)
            except DataError as err:
                failed[clip] = str(err)
                continue
            if clip not in wavs:
                failed[clip] = f"missing audio file AudioWAV/{clip}.wav"
            elif clip not in videos:
                failed[clip] = f"missing video file VideoFlash/{clip}.flv (or .mp4)"
        splits = read_split_files(raw)
        return clips.Release(
            names=names,
            failed=failed,
            label=clip_label,
            split=lambda c: splits.get(c, ""),
            job=cls.av_job(raw, out, params, lambda c: (videos[c], wavs[c], None)),
        )

    def test_fraction(self) -> float | None:
        p: CremadParams = self.params
        return p.test_fraction
