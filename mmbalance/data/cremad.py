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
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.data.audio import fbank, fix_length, resample, stft_magnitude
from mmbalance.data.base import (
    DATASETS,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
    stratified_split,
)
from mmbalance.data.cache import cached_arrays
from mmbalance.errors import DataError

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
VIDEO_SUFFIXES = (".flv", ".mp4")
STFT_SR, STFT_SECONDS, STFT_NFFT, STFT_HOP = 22050, 3.0, 512, 353
FBANK_SR, FBANK_MELS = 16000, 128
FBANK_MEAN, FBANK_STD = -4.503877, 5.141276
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A mono float32 waveform in [-1, 1] and its sample rate."""
    from scipy.io import wavfile

    sr, data = wavfile.read(path)
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if data.size == 0:
        raise ValueError("no samples")
    return data, int(sr)


def stft_features(wave: np.ndarray, sr: int) -> np.ndarray:
    """OGM-GE's CREMA-D audio: ``log(|STFT| + 1e-7)`` of 3 s at 22.05 kHz, ``(257, 188)``."""
    wave = resample(wave, sr, STFT_SR)
    length = round(STFT_SR * STFT_SECONDS)
    wave = np.tile(wave, length // len(wave) + 1)[:length]
    wave = np.clip(wave, -1.0, 1.0)
    mag = stft_magnitude(torch.from_numpy(wave), STFT_NFFT, STFT_HOP)
    return torch.log(mag + 1e-7).numpy().astype(np.float32)


def fbank_features(wave: np.ndarray, sr: int, frames: int) -> np.ndarray:
    """128-bin Kaldi-style fbank at 16 kHz, cut or padded to ``frames``, AST-normalised."""
    wave = resample(wave, sr, FBANK_SR)
    wave = fix_length(wave, max(len(wave), 400))
    feats = fbank(torch.from_numpy(wave), FBANK_SR, n_mels=FBANK_MELS).numpy()
    out = np.zeros((frames, FBANK_MELS), dtype=np.float32)
    n = min(frames, len(feats))
    out[:n] = feats[:n]
    return ((out - FBANK_MEAN) / (2 * FBANK_STD)).astype(np.float32)


def decode_frames(path: Path, size: int, fps: float = 1.0) -> np.ndarray:
    """Frames at ``fps`` (the first frame at or after each tick), resized: ``(T, s, s, 3)`` uint8."""
    import av

    frames: list[np.ndarray] = []
    next_time = 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else i / float(stream.average_rate or 1)
            if t + 1e-6 < next_time:
                continue
            image = frame.to_image().convert("RGB").resize((size, size))
            frames.append(np.asarray(image, dtype=np.uint8))
            next_time = (int(t * fps + 1e-6) + 1) / fps
    if not frames:
        raise ValueError("no video frames decoded")
    return np.stack(frames)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _outputs(out: Path, clip: str) -> dict[str, Path]:
    return {
        "stft": out / "audio_stft" / f"{clip}.npy",
        "fbank": out / "audio_fbank" / f"{clip}.npy",
        "frames": out / "frames" / f"{clip}.npy",
    }


def _prepare_clip(
    clip: str, wav: Path | None, video: Path | None, out: Path, size: int, fbank_frames: int
) -> tuple[str, str | None, int]:
    """Prepare one clip: ``(clip, error or None, number of frames)``. Never raises."""
    torch.set_num_threads(1)
    if wav is None:
        return clip, f"missing audio file AudioWAV/{clip}.wav", 0
    if video is None:
        return clip, f"missing video file VideoFlash/{clip}.flv (or .mp4)", 0
    try:
        wave, sr = read_wav(wav)
    except Exception as err:
        return clip, f"unreadable audio {wav.name}: {str(err) or type(err).__name__}", 0
    try:
        frames = decode_frames(video, size)
    except Exception as err:
        return clip, f"unreadable video {video.name}: {str(err) or type(err).__name__}", 0
    paths = _outputs(out, clip)
    _save_npy(paths["stft"], stft_features(wave, sr))
    _save_npy(paths["fbank"], fbank_features(wave, sr, fbank_frames))
    _save_npy(paths["frames"], frames)
    return clip, None, len(frames)


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
    from rich.console import Console
    from rich.progress import Progress

    raw, out = Path(raw), Path(out)
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if not 16 <= image_size <= 512:
        raise DataError(f"image size must be in [16, 512], got {image_size}")
    if not 16 <= fbank_frames <= 4096:
        raise DataError(f"fbank frames must be in [16, 4096], got {fbank_frames}")
    if not raw.is_dir():
        raise DataError(f"CREMA-D raw directory {raw} does not exist; pass the release's root")
    wavs = {p.stem: p for p in sorted((raw / "AudioWAV").glob("*.wav"))}
    videos: dict[str, Path] = {}
    for suffix in VIDEO_SUFFIXES:
        for p in sorted((raw / "VideoFlash").glob(f"*{suffix}")):
            videos.setdefault(p.stem, p)
    clips = sorted(set(wavs) | set(videos))
    if not clips:
        raise DataError(
            f"{raw} holds no AudioWAV/*.wav or VideoFlash/*.flv|*.mp4 files; "
            "pass the root of the CREMA-D release"
        )
    for sub in ("audio_stft", "audio_fbank", "frames"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    failed: dict[str, str] = {}
    for clip in clips:
        try:
            clip_label(clip)
        except DataError as err:
            failed[clip] = str(err)
    todo = [
        c
        for c in clips
        if c not in failed and not all(p.exists() for p in _outputs(out, c).values())
    ]
    done_before = len(clips) - len(failed) - len(todo)
    jobs = [(c, wavs.get(c), videos.get(c), out, image_size, fbank_frames) for c in todo]

    console = console or Console(stderr=True)
    with Progress(console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("preparing CREMA-D", total=len(jobs))
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                results = pool.map(_prepare_clip, *zip(*jobs, strict=True), chunksize=4)
                for clip, error, _ in results:
                    if error:
                        failed[clip] = error
                    bar.advance(task)
        else:
            for job in jobs:
                clip, error, _ = _prepare_clip(*job)
                if error:
                    failed[clip] = error
                bar.advance(task)

    splits = _read_split_files(raw)
    rows = []
    for clip in clips:
        if clip in failed or not all(p.exists() for p in _outputs(out, clip).values()):
            continue
        rows.append({"clip": clip, "label": clip_label(clip), "split": splits.get(clip, "")})
    tmp = out / ".manifest.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["clip", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "manifest.csv")

    report = {
        "dataset": "cremad",
        "raw": str(raw),
        "clips_found": len(clips),
        "prepared_now": len(todo) - sum(c in failed for c in todo),
        "already_prepared": done_before,
        "in_manifest": len(rows),
        "image_size": image_size,
        "fbank_frames": fbank_frames,
        "failed": [{"clip": c, "reason": failed[c]} for c in sorted(failed)],
    }
    (out / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict[str, Any], console: Any) -> None:
    """The end-of-run summary: counts, then one line per skipped clip."""
    console.print(
        f"[bold]CREMA-D[/bold]: {report['clips_found']} clips found, "
        f"{report['prepared_now']} prepared now, {report['already_prepared']} already prepared, "
        f"{report['in_manifest']} in manifest.csv, {len(report['failed'])} skipped"
    )
    for item in report["failed"]:
        console.print(f"  skipped {item['clip']}: {item['reason']}", markup=False)


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
    if not root.is_dir():
        raise DataError(f"CREMA-D directory {root} does not exist; {PREPARE_HINT}")
    path = root / "manifest.csv"
    if not path.exists():
        raise DataError(f"{path} is missing (not a prepared directory); {PREPARE_HINT}")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path} is unreadable ({err}); {PREPARE_HINT}") from err
    if not rows:
        raise DataError(f"{path} lists no clips; {PREPARE_HINT}")
    if not {"clip", "label", "split"} <= set(rows[0]):
        raise DataError(f"{path} lacks the columns clip,label,split; {PREPARE_HINT}")
    for row in rows:
        if row["label"] not in EMOTIONS:
            raise DataError(f"{path}: clip {row['clip']} has unknown label {row['label']!r}")
    return rows


def pick_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames at the centres of equal segments (the last frame repeats if short)."""
    t = len(frames)
    idx = np.minimum(((np.arange(count) + 0.5) * t / count).astype(int), t - 1)
    return frames[idx]


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing; re-run `mmbalance prepare cremad` on this directory"
        ) from None
    except Exception as err:
        raise DataError(
            f"{path} is unreadable ({type(err).__name__}); delete it and re-run "
            "`mmbalance prepare cremad` on this directory"
        ) from err


def load_arrays(root: Path, rows: Sequence[dict[str, str]], p: CremadParams) -> dict[str, Tensor]:
    """Audio ``(N, 1, F, T)`` float32, video ``(N, 3, frames, H, W)`` uint8, labels."""
    audio, video = [], []
    for row in rows:
        clip = row["clip"]
        a = _load_npy(root / f"audio_{p.audio}" / f"{clip}.npy")
        audio.append(a if p.audio == "stft" else a.T)  # fbank stored (T, F): use (F, T)
        v = _load_npy(root / "frames" / f"{clip}.npy")
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
