"""``cremad``: CREMA-D (6 emotions, audio + face video) from a directory made by ``prepare``.

Two steps, because decoding 7,442 videos takes a while and is done once:

1. :func:`prepare` (``mmbalance prepare cremad --raw DIR --out DIR``) reads the raw release
   (``AudioWAV/<clip>.wav`` and ``VideoFlash/<clip>.flv`` or ``.mp4``) and writes, per clip,
   both audio recipes and the frames as ``.npy`` files plus ``manifest.csv``:

   * ``audio_stft/<clip>.npy``: the OGM-GE recipe. Resample to 22.05 kHz, tile to exactly 3 s,
     clip to [-1, 1], STFT n_fft 512 / hop 353, ``log(|S| + 1e-7)``: ``(257, 188)`` float32.
   * ``audio_fbank/<clip>.npy``: the Kaldi-style recipe OGM-GE ships for Kinetics-Sounds.
     16 kHz, 128 mel bins, 25 ms frames, 10 ms shift, cut or zero-padded to ``fbank_frames``
     (1024 in that script), normalised as ``(x + 4.503877) / (2 * 5.141276)``:
     ``(fbank_frames, 128)`` float32. The window is Hamming (this library's ``fbank``), where
     the reference script uses Hann.
   * ``frames/<clip>.npy``: the video decoded at 1 fps (the first frame of every second),
     resized to ``image_size`` squared: ``(T, image_size, image_size, 3)`` uint8.

   A clip whose three files exist is skipped, so a second run does nothing and an interrupted
   run resumes; files are written under a temporary name and renamed, so a crash never leaves a
   half-written one. Unreadable or missing files are skipped and listed in the final report and
   in ``prepare_report.json``. If the raw directory holds the OGM-GE split files ``train.csv``
   and ``test.csv`` (``clip,EMO`` rows), the manifest records each clip's split.

2. The dataset source loads the prepared directory (``dataset.root``). The community split has
   no validation set: one is carved from the training clips (stratified, ``dataset.seed``), and
   the bundle's ``notes`` say so. Without split files, a stratified test split is carved too.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.data import clips
from mmbalance.data.base import (
    DATASETS,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
    stratified_split,
)
from mmbalance.data.cache import cached_arrays
from mmbalance.data.clips import (  # noqa: F401  (re-exported: the CREMA-D recipe's pieces)
    FBANK_MEAN,
    FBANK_MELS,
    FBANK_SR,
    FBANK_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    STFT_HOP,
    STFT_NFFT,
    STFT_SECONDS,
    STFT_SR,
    decode_frames,
    fbank_features,
    pick_frames,
    read_wav,
    stft_features,
)
from mmbalance.errors import DataError

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
VIDEO_SUFFIXES = (".flv", ".mp4")
#: Bumped whenever the prepared layout or the loading changes.
VERSION = 1
PREPARE_HINT = "run `mmbalance prepare cremad --raw RAW_DIR --out DIR` and set dataset.root=DIR"


# --------------------------------------------------------------------------- preparation


def clip_label(clip: str) -> str:
    """The emotion code of a CREMA-D clip name ``<actor>_<sentence>_<EMO>_<level>``."""
    parts = clip.split("_")
    if len(parts) < 3 or parts[2] not in EMOTIONS:
        raise DataError(f"clip name {clip!r} does not follow ACTOR_SENTENCE_EMO_LEVEL")
    return parts[2]


def _outputs(out: Path, clip: str) -> dict[str, Path]:
    return {
        "stft": out / "audio_stft" / f"{clip}.npy",
        "fbank": out / "audio_fbank" / f"{clip}.npy",
        "frames": out / "frames" / f"{clip}.npy",
    }


def _prepare_clip(
    clip: str, wav: Path | None, video: Path | None, out: Path, size: int, fbank_frames: int
) -> tuple[str, str | None]:
    """Prepare one clip: ``(clip, error or None)``. Never raises."""
    torch.set_num_threads(1)
    if wav is None:
        return clip, f"missing audio file AudioWAV/{clip}.wav"
    if video is None:
        return clip, f"missing video file VideoFlash/{clip}.flv (or .mp4)"
    try:
        wave, sr = read_wav(wav)
    except Exception as err:
        return clip, f"unreadable audio {wav.name}: {str(err) or type(err).__name__}"
    try:
        frames = decode_frames(video, size)
    except Exception as err:
        return clip, f"unreadable video {video.name}: {str(err) or type(err).__name__}"
    paths = _outputs(out, clip)
    clips.save_npy(paths["stft"], stft_features(wave, sr))
    clips.save_npy(paths["fbank"], fbank_features(wave, sr, fbank_frames))
    clips.save_npy(paths["frames"], frames)
    return clip, None


def _read_split_files(raw: Path) -> dict[str, str]:
    """``clip -> train|test`` from OGM-GE's ``train.csv`` / ``test.csv``, if present."""
    splits: dict[str, str] = {}
    for split in ("train", "test"):
        path = raw / f"{split}.csv"
        if not path.exists():
            continue
        with path.open(newline="") as f:
            for row in csv.reader(f):
                if row and row[0].strip() and row[0].strip().lower() != "clip":
                    splits[row[0].strip()] = split
    return splits


def prepare(
    raw: str | Path,
    out: str | Path,
    workers: int = 1,
    image_size: int = 112,
    fbank_frames: int = 1024,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Prepare CREMA-D from ``raw`` into ``out`` (see the module docstring); returns the report.

    ``workers > 1`` runs spawned processes, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard (the ``mmbalance`` command has it).
    """
    raw, out = Path(raw), Path(out)
    clips.check_prepare_args(workers, image_size, fbank_frames)
    if not raw.is_dir():
        raise DataError(f"CREMA-D raw directory {raw} does not exist; pass the release's root")
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
    splits = _read_split_files(raw)
    return clips.prepare_clips(
        dataset="cremad",
        title="CREMA-D",
        raw=raw,
        out=out,
        names=names,
        failed=failed,
        outputs=lambda c: list(_outputs(out, c).values()),
        job=lambda c: (c, wavs.get(c), videos.get(c), out, image_size, fbank_frames),
        func=_prepare_clip,
        label=clip_label,
        split=lambda c: splits.get(c, ""),
        workers=workers,
        progress=progress,
        console=console,
        settings={"image_size": image_size, "fbank_frames": fbank_frames},
    )


def print_report(report: dict[str, Any], console: Any) -> None:
    """The end-of-run summary: counts, then one line per skipped clip."""
    clips.print_report(report, console, "CREMA-D")


# --------------------------------------------------------------------------- dataset source


@dataclass
class CremadParams:
    """Options of CREMA-D (a prepared directory; see :func:`prepare`)."""

    root: str | None = None
    audio: Literal["stft", "fbank"] = "stft"
    frames: int = 1
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        check(1 <= self.frames <= 16, f"dataset.frames must be in [1, 16], got {self.frames}")
        check(
            0 < self.val_fraction < 0.5,
            f"dataset.val_fraction must be in (0, 0.5), got {self.val_fraction}",
        )
        check(
            0 < self.test_fraction < 0.5,
            f"dataset.test_fraction must be in (0, 0.5), got {self.test_fraction}",
        )


def read_manifest(root: Path) -> list[dict[str, str]]:
    """The prepared directory's manifest rows, or a :class:`DataError` saying how to make it."""
    return clips.read_manifest(root, "CREMA-D", PREPARE_HINT, EMOTIONS)


def load_arrays(root: Path, rows: Sequence[dict[str, str]], p: CremadParams) -> dict[str, Tensor]:
    """Audio ``(N, 1, F, T)`` float32, video ``(N, 3, frames, H, W)`` uint8, labels."""
    audio, video = [], []
    for row in rows:
        clip = row["clip"]
        a = clips.load_npy(root / f"audio_{p.audio}" / f"{clip}.npy", "cremad")
        audio.append(a if p.audio == "stft" else a.T)  # fbank stored (T, F): use (F, T)
        v = clips.load_npy(root / "frames" / f"{clip}.npy", "cremad")
        if v.ndim != 4 or v.shape[-1] != 3 or len(v) == 0:
            raise DataError(f"{root / 'frames' / clip}.npy has shape {v.shape}, not (T, H, W, 3)")
        video.append(pick_frames(v, p.frames))
    shapes = {a.shape for a in audio} | {("v", *v.shape) for v in video}
    if len(shapes) != 2:
        raise DataError(f"{root} mixes feature shapes {sorted(map(str, shapes))}; re-prepare it")
    return {
        "audio": torch.from_numpy(np.stack(audio)).unsqueeze(1).float(),
        "video": torch.from_numpy(np.stack(video)).permute(0, 4, 1, 2, 3).contiguous(),
        "targets": torch.tensor([EMOTIONS.index(r["label"]) for r in rows], dtype=torch.long),
    }


def _split_indices(
    rows: Sequence[dict[str, str]], targets: Tensor, p: CremadParams
) -> tuple[dict[str, Tensor], str]:
    given = [r["split"] for r in rows]
    if all(s in ("train", "test") for s in given):
        is_train = torch.tensor([s == "train" for s in given])
        train_all = torch.nonzero(is_train).flatten()
        test = torch.nonzero(~is_train).flatten()
        if len(train_all) == 0 or len(test) == 0:
            raise DataError("CREMA-D manifest needs clips in both the train and the test split")
        keep, val = stratified_split(
            targets[train_all], [1 - p.val_fraction, p.val_fraction], p.seed
        )
        note = (
            f"the given train/test split; validation = a stratified {p.val_fraction:.2f} of the "
            f"training clips (seed {p.seed}), since the community split has none"
        )
        return {"train": train_all[keep], "val": train_all[val], "test": test}, note
    v, t = p.val_fraction, p.test_fraction
    train, val, test = stratified_split(targets, [1 - v - t, v, t], p.seed)
    note = (
        f"no train/test split files were prepared: stratified {1 - v - t:.2f}/{v:.2f}/{t:.2f} "
        f"train/val/test split of all clips (seed {p.seed})"
    )
    return {"train": train, "val": val, "test": test}, note


@DATASETS.register("cremad")
class CremadSource(DatasetSource):
    Params = CremadParams
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

    def build(self) -> DatasetBundle:
        p: CremadParams = self.params
        if not p.root:
            raise DataError(f"dataset.root is not set; {PREPARE_HINT}")
        root = Path(p.root).expanduser().resolve()
        rows = read_manifest(root)
        manifest_hash = hashlib.sha256((root / "manifest.csv").read_bytes()).hexdigest()
        recipe = {
            "dataset": "cremad",
            "version": VERSION,
            "root": str(root),
            "manifest": manifest_hash,
            "audio": p.audio,
            "frames": p.frames,
        }
        loader: Callable[[], dict[str, Tensor]] = lambda: load_arrays(root, rows, p)  # noqa: E731
        arrays = cached_arrays(self.cache_dir, "cremad", recipe, loader)
        index, note = _split_indices(rows, arrays["targets"], p)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
        splits = {}
        for name, idx in index.items():
            video = (arrays["video"][idx].float() / 255.0 - mean) / std
            splits[name] = MultimodalTensorDataset(
                {"audio": arrays["audio"][idx], "video": video}, arrays["targets"][idx]
            )
        specs = {
            "audio": ModalitySpec("audio", tuple(arrays["audio"].shape[1:]), "resnet18", {}),
            "video": ModalitySpec("video", tuple(arrays["video"].shape[1:]), "resnet18", {}),
        }
        return DatasetBundle(
            name="cremad",
            task="classification",
            num_outputs=len(EMOTIONS),
            modalities=specs,
            splits=splits,
            class_names=list(EMOTIONS),
            notes=f"CREMA-D prepared in {root} (audio {p.audio}, {p.frames} frame(s)); {note}",
        )
