"""Shared machinery of the prepared clip datasets (CREMA-D, AVE, Kinetics-Sounds, UCF-101).

Every video dataset is used in two steps: ``mmbalance prepare NAME --raw DIR --out DIR`` decodes
the raw release once into per-clip ``.npy`` files plus ``manifest.csv`` (``clip,label,split``)
and ``prepare_report.json``; the dataset source then stacks those files into tensors, cached by
:func:`mmbalance.data.cache.cached_arrays` and loaded memory-mapped on later runs. This module holds
the pieces the datasets share, so each dataset file only knows its release's layout:

* decoding: WAV files and video audio tracks to mono float waveforms, video frames at 1 fps or at
  segment centres (PyAV), image files (frame folders, optical-flow JPEGs);
* the papers' audio front-ends on top of :mod:`mmbalance.data.audio` (OGM-GE's log-STFT and the
  Kaldi-style fbank of OGM-GE's ``process_audio.py``);
* crash-safe writes (temporary name, then rename), so an interrupted ``prepare`` resumes;
* the parallel, progress-barred job runner whose jobs never raise but return an error string, so
  one corrupt file is skipped and reported instead of stopping a run of thousands;
* manifest reading and writing, the train/val/test split rule and the normalisation of frames;
* the checks that keep every path inside its directory: a clip name from a release's list or a
  prepared manifest must be a plain file name, and a prepared file must resolve inside the
  prepared directory (a symlinked directory as a whole is fine);
* :class:`ClipSource`, the registered dataset class of a prepared dataset: its options
  (:class:`ClipParams`, :class:`ClipPrepareParams`), ``prepare`` (find the release's clips,
  decode them, write the manifest) and ``build`` (read the manifest, stack, cache and split);
  :class:`AudioVisualSource` adds the audio + frames bundle that CREMA-D, AVE and
  Kinetics-Sounds share.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.data.audio import fbank, fix_length, resample, stft_magnitude
from mmbalance.data.base import (
    Batch,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
    error_text,
    stratified_split,
)
from mmbalance.errors import DataError, shown
from mmbalance.io import (
    claim_output,
    is_written_file,
    make_dir,
    open_regular,
    output_lock,
    read_json,
    read_text,
    write_binary_atomic,
    write_json_atomic,
    write_text_atomic,
)

STFT_SR, STFT_SECONDS, STFT_NFFT, STFT_HOP = 22050, 3.0, 512, 353
FBANK_SR, FBANK_MELS = 16000, 128
FBANK_MEAN, FBANK_STD = -4.503877, 5.141276
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: A preparation job's result: ``(clip, error or None)``.
JobResult = tuple[str, str | None]


# --------------------------------------------------------------------------- decoding


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


def read_audio_track(path: Path) -> tuple[np.ndarray, int]:
    """The first audio stream of a video file as a mono float32 waveform and its sample rate.

    The releases of AVE and Kinetics-Sounds are YouTube videos whose sound is only inside the
    container, so the audio is decoded with PyAV instead of requiring an ffmpeg pass to WAV.
    """
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        sr = int(stream.rate or stream.codec_context.sample_rate or 0)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr or None)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if wave.size == 0 or sr <= 0:
        raise ValueError("no audio samples")
    return wave, sr


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


def segment_centres(total: int, count: int) -> np.ndarray:
    """Indices of the centres of ``count`` equal segments of ``total`` items (TSN sampling)."""
    return np.minimum(((np.arange(count) + 0.5) * total / count).astype(int), total - 1)


def decode_frames_at(path: Path, size: int, count: int) -> np.ndarray:
    """``count`` frames at the segment centres of the whole video: ``(count, s, s, 3)`` uint8.

    Used where frames must line up with another per-frame stream (UCF-101's optical flow), which
    1-fps sampling would not: both are sampled at the same relative positions.
    """
    import av

    with av.open(str(path)) as container:
        decoded = list(container.decode(container.streams.video[0]))
    if not decoded:
        raise ValueError("no video frames decoded")
    return np.stack(
        [
            np.asarray(decoded[i].to_image().convert("RGB").resize((size, size)), dtype=np.uint8)
            for i in segment_centres(len(decoded), count)
        ]
    )


def read_images(paths: Sequence[Path], size: int, mode: str = "RGB") -> np.ndarray:
    """Image files resized to ``size`` squared: ``(T, s, s, 3)`` (RGB) or ``(T, s, s)`` (L)."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as image:
            out.append(np.asarray(image.convert(mode).resize((size, size)), dtype=np.uint8))
    if not out:
        raise ValueError("no frames")
    return np.stack(out)


def image_files(folder: Path) -> list[Path]:
    """The image files of a frame folder in name order (frame numbers are zero-padded)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- audio front-ends


def stft_features(wave: np.ndarray, sr: int, seconds: float = STFT_SECONDS) -> np.ndarray:
    """OGM-GE's audio: ``log(|STFT| + 1e-7)`` of ``seconds`` at 22.05 kHz (tiled), n_fft 512 / hop 353.

    3 s (CREMA-D) gives ``(257, 188)``; 10 s (AVE, Kinetics-Sounds) gives ``(257, 625)``.
    """
    wave = resample(wave, sr, STFT_SR)
    length = round(STFT_SR * seconds)
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


# --------------------------------------------------------------------------- files and jobs


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write through :mod:`mmbalance.io`'s atomic writer: a crash never leaves a half-written
    file, and a link planted at ``path`` is replaced, never written through."""
    write_binary_atomic(path, lambda f: np.save(f, array))


def load_npy(path: Path, dataset: str) -> np.ndarray:
    """A prepared array of numbers, memory-mapped, or a one-line :class:`DataError` saying how
    to fix it: a missing file, one that is not a regular file (a FIFO would hang the read), not
    a ``.npy`` array (an ``.npz`` archive under that name, a pickle) or not numbers (text)."""
    redo = f"delete it and re-run `mmbalance prepare {dataset}` on this directory"
    try:
        open_regular(path).close()  # opened without blocking and checked, never read
    except DataError as err:
        if "does not exist" in str(err):
            raise DataError(
                f"{path} is missing; re-run `mmbalance prepare {dataset}` on this directory"
            ) from None
        raise DataError(f"{err}; {redo}") from None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__}); {redo}") from None
    if not isinstance(array, np.ndarray):
        close = getattr(array, "close", None)
        if close is not None:
            close()
        raise DataError(f"{path} is not a .npy array (an .npz archive?); {redo}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path} holds {array.dtype} values, not numbers; {redo}")
    return array


def pick_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames at the centres of equal segments (the last frame repeats if short)."""
    return frames[segment_centres(len(frames), count)]


def run_jobs(
    func: Callable[..., JobResult],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    title: str,
    progress: bool,
    console: Any,
) -> dict[str, str]:
    """Run ``func(*job)`` for every job with a progress bar; returns ``{clip: error}``.

    ``workers > 1`` uses spawned processes (fork would copy the parent's torch threads), so a
    calling script needs the usual ``if __name__ == "__main__":`` guard.
    """
    from rich.progress import Progress

    failed: dict[str, str] = {}
    with Progress(console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task(title, total=len(jobs))
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for clip, error in pool.map(func, *zip(*jobs, strict=True), chunksize=4):
                    if error:
                        failed[clip] = error
                    bar.advance(task)
        else:
            for job in jobs:
                clip, error = func(*job)
                if error:
                    failed[clip] = error
                bar.advance(task)
    return failed


def prepare_clips(
    *,
    dataset: str,
    title: str,
    raw: Path,
    out: Path,
    release: Release,
    workers: int,
    progress: bool,
    console: Any,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The shared body of every ``prepare``: skip done clips, run the rest, manifest, report.

    ``release.names`` are all clips found in the raw release; ``release.failed`` already holds
    those rejected before decoding (unknown label, missing file). A clip whose outputs all exist
    is left alone, so a second run does nothing and an interrupted run resumes. Returns the
    report, also written to ``prepare_report.json``. If no clip at all could be prepared, the
    report is written and a :class:`DataError` names the first reason: a run that produced
    nothing usable is a failure, not a success with an empty manifest.
    """
    from rich.console import Console

    names, failed = release.names, dict(release.failed)

    def outputs(clip: str) -> list[Path]:
        return release.outputs(out, clip)

    for path in {p.parent for name in names[:1] for p in outputs(name)}:
        make_dir(path)
    todo = [c for c in names if c not in failed and not all(map(is_written_file, outputs(c)))]
    done_before = len(names) - len(failed) - len(todo)
    console = console or Console(stderr=True)
    jobs = [release.job(c) for c in todo]
    failed.update(run_jobs(release.func, jobs, workers, f"preparing {title}", progress, console))
    rows = [
        {"clip": c, "label": release.label(c), "split": release.split(c)}
        for c in names
        if c not in failed and all(map(is_written_file, outputs(c)))
    ]
    write_manifest(out, rows)
    report = {
        "dataset": dataset,
        "raw": str(raw),
        "clips_found": len(names),
        "prepared_now": len(todo) - sum(c in failed for c in todo),
        "already_prepared": done_before,
        "in_manifest": len(rows),
        **settings,
        "failed": [{"clip": c, "reason": failed[c]} for c in sorted(failed)],
    }
    report_path = out / "prepare_report.json"
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    if not rows:
        first = min(failed)
        raise DataError(
            f"no {title} clip could be prepared: all {len(names)} failed (first, {first}: "
            f"{failed[first]}); every reason is in {report_path}"
        )
    return report


#: Where a prepared directory records what it was prepared from and with.
PREPARE_OPTIONS_FILE = "prepare_options.json"


def record_prepare_options(out: Path, dataset: str, options: Mapping[str, Any]) -> None:
    """Record the dataset and the options (all but ``workers``) ``out`` is prepared with, before
    anything is prepared; a directory prepared with others is refused in one line (a rerun
    prepares only missing clips, so other options would mix two preparations)."""
    path = out / PREPARE_OPTIONS_FILE
    wanted = {"dataset": dataset, "options": dict(options)}
    if is_written_file(path):
        saved = read_json(path)
        if saved != wanted:
            before = saved.get("options", {}) if isinstance(saved, dict) else {}
            before = before if isinstance(before, dict) else {}
            if not isinstance(saved, dict) or saved.get("dataset") != dataset:
                what = (
                    f"dataset {str(saved.get('dataset') if isinstance(saved, dict) else '?')!r:.40}"
                )
            else:
                keys = sorted(
                    k for k in options.keys() | before.keys() if before.get(k) != options.get(k)
                )
                what = ", ".join(
                    f"--{k.replace('_', '-')} {shown(before.get(k), 20)} (now {shown(options.get(k), 20)})"
                    for k in keys
                )
            raise DataError(
                f"{str(out)!r} was prepared with {what}; prepare into another --out, or delete "
                "it to prepare it again"
            )
        return
    write_json_atomic(path, wanted)


def write_manifest(out: Path, rows: Iterable[dict[str, str]]) -> None:
    """``manifest.csv`` with columns ``clip,label,split``, written atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["clip", "label", "split"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "manifest.csv", text.getvalue())


def print_report(report: Mapping[str, Any], console: Any, title: str) -> None:
    """The end-of-run summary: counts, then one line per skipped clip."""
    console.print(
        f"[bold]{title}[/bold]: {report['clips_found']} clips found, "
        f"{report['prepared_now']} prepared now, {report['already_prepared']} already prepared, "
        f"{report['in_manifest']} in manifest.csv, {len(report['failed'])} skipped"
    )
    for item in report["failed"]:
        console.print(f"  skipped {item['clip']}: {item['reason']}", markup=False)


# --------------------------------------------------------------------------- names and paths


def check_clip_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name, else a one-line :class:`DataError` naming ``where``.

    Clip names become file names (``<out>/frames/<clip>.npy``, ``<raw>/rgb/<clip>/``), so a name
    with a path separator, ``..`` or an absolute path would lead outside the directory: a list
    or manifest from elsewhere could make ``prepare`` write, or a run read, any file. Control
    characters are refused too (they have no place in a file name and would split messages).
    """
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(c) < 32 for c in name)
        or Path(name).is_absolute()
    ):
        raise DataError(
            f"{where}: clip name {name!r} is not a plain file name (it would lead outside the "
            "dataset's directory); fix or remove that entry"
        )
    return name


def inside(root: Path, path: Path, hint: str) -> Path:
    """``path`` if it resolves inside the resolved directory ``root`` (symlinks followed)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise DataError(
            f"{path} resolves to {resolved}, outside the prepared directory {root}; a prepared "
            f"directory must hold its own files (a symlink to the whole directory is fine); {hint}"
        )
    return path


# --------------------------------------------------------------------------- loading


def read_manifest(
    root: Path, title: str, hint: str, labels: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """The prepared directory's manifest rows, or a :class:`DataError` saying how to make it."""
    if not root.is_dir():
        raise DataError(f"{title} directory {root} does not exist; {hint}")
    path = root / "manifest.csv"
    if not path.exists():
        raise DataError(f"{path} is missing (not a prepared directory); {hint}")
    try:
        text = read_text(path, what=str(path))
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise DataError(f"{path} is unreadable ({err}); {hint}") from None
    except DataError as err:
        raise DataError(f"{err}; {hint}") from None
    if not rows:
        raise DataError(f"{path} lists no clips; {hint}")
    if not {"clip", "label", "split"} <= set(rows[0]):
        raise DataError(f"{path} lacks the columns clip,label,split; {hint}")
    for n, row in enumerate(rows, 2):
        if None in row.values() or None in row:
            raise DataError(f"{path}:{n} does not have exactly the columns clip,label,split")
        check_clip_name(row["clip"], f"{path}:{n}")
    if labels is not None:
        known = set(labels)
        for row in rows:
            if row["label"] not in known:
                raise DataError(f"{path}: clip {row['clip']} has unknown label {row['label']!r}")
    return rows


def read_classes(root: Path, rows: Sequence[dict[str, str]], hint: str) -> list[str]:
    """The class names of a prepared directory (``classes.txt``, label order), checked."""
    path = root / "classes.txt"
    if not path.exists():
        raise DataError(f"{path} is missing (not a prepared directory); {hint}")
    try:
        classes = [c for c in read_text(path, what=str(path)).splitlines() if c]
    except DataError as err:
        raise DataError(f"{err}; {hint}") from None
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise DataError(f"{root / 'manifest.csv'} has labels {unknown} not in classes.txt; {hint}")
    return classes


def split_indices(
    rows: Sequence[dict[str, str]],
    targets: Tensor,
    val_fraction: float,
    seed: int,
    title: str,
    test_fraction: float | None = None,
) -> tuple[dict[str, Tensor], str]:
    """Train/val/test indices from the manifest's ``split`` column, and a note saying how.

    ``train``/``val``/``test`` are taken as given. Without a ``val`` split (the community has
    none for several datasets), a stratified ``val_fraction`` of the training clips becomes the
    validation split, with ``seed``, so checkpoints are never selected on the test set. A
    manifest that gives no split at all (a release without split files) is split stratified
    into train/val/test with ``val_fraction`` and ``test_fraction``, where the dataset allows
    it. A manifest that gives a split for some clips only is refused, rather than guessed at.
    """
    given = [r["split"] for r in rows]
    bad = sorted(set(given) - {"train", "val", "test", ""})
    if bad:
        raise DataError(f"{title} manifest has unknown split names {bad}; re-prepare it")
    unsplit = [r["clip"] for r in rows if not r["split"]]
    if len(unsplit) == len(rows) and test_fraction is not None:
        v, t = val_fraction, test_fraction
        train, val, test = stratified_split(targets, [1 - v - t, v, t], seed)
        note = (
            f"no train/test split files were prepared: stratified {1 - v - t:.2f}/{v:.2f}/"
            f"{t:.2f} train/val/test split of all clips (seed {seed})"
        )
        return _nonempty({"train": train, "val": val, "test": test}, title), note
    if unsplit:
        raise DataError(
            f"{title} manifest gives no split for {len(unsplit)} of its {len(rows)} clips "
            f"(e.g. {unsplit[0]}); give every clip a split in the release's split files and "
            "re-prepare"
        )
    index = {s: torch.tensor([i for i, g in enumerate(given) if g == s]).long() for s in given}
    for s in ("train", "test"):
        if len(index.get(s, [])) == 0:
            raise DataError(f"{title} manifest needs clips in both the train and the test split")
    if len(index.get("val", [])):
        return index, "the official train/val/test split"
    train_all = index["train"]
    keep, val = stratified_split(targets[train_all], [1 - val_fraction, val_fraction], seed)
    index["train"], index["val"] = train_all[keep], train_all[val]
    note = (
        f"the given train/test split; validation = a stratified {val_fraction:.2f} of the "
        f"training clips (seed {seed}), since the community split has none"
    )
    return _nonempty(index, title), note


def _nonempty(index: dict[str, Tensor], title: str) -> dict[str, Tensor]:
    for split, rows in index.items():
        if len(rows) == 0:
            raise DataError(
                f"{title}: the {split} split gets no clip with these fractions; raise "
                "dataset.val_fraction (or dataset.test_fraction) or prepare more clips"
            )
    return index


def stack_clips(
    root: Path,
    rows: Sequence[dict[str, str]],
    dataset: str,
    parts: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
    hint: str,
) -> dict[str, np.ndarray]:
    """For each part ``name -> (subdir, transform)``: the clips' transformed arrays, stacked.

    Per-clip files are read memory-mapped, so only the selected frames are paged in. Every file
    must resolve inside ``root`` (see :func:`inside`).
    """
    out: dict[str, np.ndarray] = {}
    for name, (subdir, transform) in parts.items():
        arrays = []
        for row in rows:
            path = inside(root, root / subdir / f"{row['clip']}.npy", hint)
            try:
                array = np.ascontiguousarray(transform(load_npy(path, dataset)))
            except (ValueError, IndexError) as err:
                raise DataError(f"{path} has an unexpected shape ({err}); re-prepare it") from None
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise DataError(
                    f"{path} holds NaN or infinite values; delete it and re-run "
                    f"`mmbalance prepare {dataset}` on this directory"
                )
            arrays.append(array)
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(
                f"{root / subdir} mixes array shapes {sorted(map(str, shapes))}; re-prepare it"
            )
        out[name] = np.stack(arrays)
    return out


def files_stamp(root: Path) -> str:
    """A cheap fingerprint of every file in the prepared directory ``root``: the name, type,
    size, modification and change times and inode of each (links inside are followed; hidden
    temporaries are left out). Any change to a file (rewritten, touched, replaced, a FIFO put in
    its place) changes it, so a cache keyed on it is never stale."""
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            h.update(
                f"{rel}|{st.st_mode}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}\n".encode(
                    errors="surrogateescape"
                )
            )
    return h.hexdigest()


def content_ids(stacked: Mapping[str, np.ndarray]) -> Tensor:
    """One 64-bit hash per clip of all its stacked arrays (equal ids: the same content)."""
    n = len(next(iter(stacked.values())))
    ids = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=8)
        for name in sorted(stacked):
            h.update(name.encode())
            h.update(np.ascontiguousarray(stacked[name][i]).tobytes())
        ids.append(int.from_bytes(h.digest(), "little", signed=True))
    return torch.tensor(ids, dtype=torch.int64)


def check_disjoint_splits(
    rows: Sequence[dict[str, str]],
    index: Mapping[str, Tensor],
    ids: Tensor | None,
    title: str,
) -> None:
    """Refuse, in one line with their count and an example, clips that sit in two splits: the
    same clip name (path), or the same content (``ids``, see :func:`content_ids``) under two
    names. A clip tested on must never have been trained on or selected with."""
    order = [s for s in ("train", "val", "test") if s in index]
    seen_name: dict[str, str] = {}
    seen_id: dict[int, tuple[str, str]] = {}
    by_name: list[tuple[str, str, str]] = []
    by_content: list[tuple[str, str, str, str]] = []
    for split in order:
        for i in index[split].tolist():
            clip = rows[i]["clip"]
            first = seen_name.setdefault(clip, split)
            if first != split:
                by_name.append((clip, first, split))
                continue
            if ids is None:
                continue
            other = seen_id.setdefault(int(ids[i]), (clip, split))
            if other[1] != split:
                by_content.append((other[0], other[1], clip, split))
    if by_name:
        clip, a, b = by_name[0]
        raise DataError(
            f"{title}: {len(by_name)} clip(s) are listed in two splits (e.g. {clip!r} in {a} "
            f"and {b}); give every clip one split in the manifest"
        )
    if by_content:
        c1, a, c2, b = by_content[0]
        raise DataError(
            f"{title}: {len(by_content)} clip(s) have the same content as a clip of another "
            f"split (e.g. {c2!r} in {b} and {c1!r} in {a}); remove the duplicates"
        )


def frames_transform(count: int, channels: int) -> Callable[[np.ndarray], np.ndarray]:
    """Check a stored ``(T, H, W, C)`` uint8 clip and pick ``count`` frames from it."""

    def pick(v: np.ndarray) -> np.ndarray:
        if v.ndim != 4 or v.shape[-1] != channels or len(v) == 0:
            raise ValueError(f"shape {v.shape}, not (T, H, W, {channels})")
        return pick_frames(v, count)

    return pick


def to_clip_tensor(frames: np.ndarray) -> Tensor:
    """Stacked ``(N, T, H, W, C)`` uint8 frames as the encoders' ``(N, C, T, H, W)``."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).contiguous()


def normalise_rgb(video: Tensor) -> Tensor:
    """uint8 ``(N, 3, T, H, W)`` frames to ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (video.float() / 255.0 - mean) / std


def normalise_flow(flow: Tensor) -> Tensor:
    """uint8 optical-flow JPEGs (128 = no motion) to float32 in about [-1, 1]."""
    return (flow.float() - 128.0) / 128.0


class ClipDataset(MultimodalTensorDataset):
    """One split of a prepared clip dataset, gathered and normalised a batch at a time.

    ``arrays`` are the whole dataset's stacked arrays as loaded from the cache (memory-mapped,
    frames as uint8), ``index`` the split's rows. Nothing is copied when the split is made: a
    batch gathers its rows and applies the per-modality ``normalise`` (uint8 frames to float),
    so a large dataset costs page cache, not a float32 copy of every frame. ``inputs`` still
    gives the split's normalised tensors for code that wants them whole.
    """

    def __init__(
        self,
        arrays: Mapping[str, Tensor],
        targets: Tensor,
        index: Tensor,
        normalise: Mapping[str, Callable[[Tensor], Tensor]],
    ) -> None:
        if len(index) == 0:
            raise DataError("dataset split is empty")
        self.arrays = dict(arrays)
        self.index = index.long()
        self.targets = targets[self.index]
        self.normalise = dict(normalise)

    @property
    def inputs(self) -> dict[str, Tensor]:  # type: ignore[override]
        return self._gather(self.index)

    def _gather(self, rows: Tensor) -> dict[str, Tensor]:
        out = {}
        for m, x in self.arrays.items():
            fn = self.normalise.get(m)
            out[m] = fn(x[rows]) if fn else x[rows]
        return out

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch(self._gather(self.index[idx]), self.targets[idx], idx)

    def subset(self, indices: Tensor) -> ClipDataset:
        return ClipDataset(self.arrays, _full_targets(self), self.index[indices], self.normalise)


def _full_targets(ds: ClipDataset) -> Tensor:
    n = int(next(iter(ds.arrays.values())).shape[0])
    full = torch.zeros(n, dtype=ds.targets.dtype)
    full[ds.index] = ds.targets
    return full


def av_outputs(out: Path, clip: str) -> list[Path]:
    """The files an audio-visual clip is prepared into (CREMA-D's layout)."""
    return [out / sub / f"{clip}.npy" for sub in ("audio_stft", "audio_fbank", "frames")]


def prepare_av_clip(
    clip: str,
    video: Path | None,
    wav: Path | None,
    frame_dir: Path | None,
    out: Path,
    size: int,
    fbank_frames: int,
    seconds: float,
    raw: Path,
) -> JobResult:
    """Audio from ``wav`` (else the video's sound), frames from ``frame_dir`` (else the video).

    Writes both audio recipes (log-STFT of ``seconds``, fbank of ``fbank_frames``) and the
    1-fps frames. Returns ``(clip, error or None)``; never raises, so one bad file is skipped.
    """
    torch.set_num_threads(1)

    def rel(p: Path) -> str:
        return str(p.relative_to(raw)) if p.is_relative_to(raw) else p.name

    if wav is None and video is None:
        return clip, f"missing audio file audio/{clip}.wav (and no video to take the sound from)"
    if frame_dir is None and video is None:
        return clip, f"missing frames frames/{clip}/ (and no video to decode them from)"
    try:
        wave, sr = read_wav(wav) if wav is not None else read_audio_track(video)  # type: ignore[arg-type]
    except Exception as err:
        return clip, f"unreadable audio in {rel(wav or video)}: {error_text(err)}"  # type: ignore[arg-type]
    try:
        if frame_dir is not None:
            frames = read_images(image_files(frame_dir), size)
        else:
            frames = decode_frames(video, size)  # type: ignore[arg-type]
    except Exception as err:
        return clip, f"unreadable video {rel(frame_dir or video)}: {error_text(err)}"  # type: ignore[arg-type]
    stft_path, fbank_path, frames_path = av_outputs(out, clip)
    save_npy(stft_path, stft_features(wave, sr, seconds))
    save_npy(fbank_path, fbank_features(wave, sr, fbank_frames))
    save_npy(frames_path, frames)
    return clip, None


def index_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """``stem -> path`` of the files under ``folder`` (recursively, e.g. per-split folders)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in suffixes and p.is_file():
            found.setdefault(p.stem, p)
    return found


def index_frame_dirs(folder: Path) -> dict[str, Path]:
    """``name -> folder`` of the frame folders (folders holding images) under ``folder``."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(p.parent.name, p.parent)
    return found


def av_parts(audio: str, frames: int) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """What the audio-visual sources stack: the chosen audio recipe and ``frames`` frames."""

    def audio_fn(a: np.ndarray) -> np.ndarray:
        if a.ndim != 2:
            raise ValueError(f"shape {a.shape}, not 2-D")
        return a if audio == "stft" else a.T  # fbank stored (T, F): use (F, T)

    return {"audio": (f"audio_{audio}", audio_fn), "video": ("frames", frames_transform(frames, 3))}


AV_TO_TENSOR: dict[str, Callable[[np.ndarray], Tensor]] = {
    "audio": lambda a: torch.from_numpy(a).unsqueeze(1).float(),
    "video": to_clip_tensor,
}


# --------------------------------------------------------------------------- dataset sources


@dataclass
class ClipPrepareParams:
    """Options of ``mmbalance prepare`` shared by every clip dataset.

    Attributes:
        workers: parallel processes decoding the clips.
        image_size: side of the stored square frames, in pixels.
    """

    workers: int = 1
    image_size: int = 112

    def __post_init__(self) -> None:
        check(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        check(
            16 <= self.image_size <= 512,
            f"--image-size must be in [16, 512], got {self.image_size}",
        )


@dataclass
class AudioVisualPrepareParams(ClipPrepareParams):
    """Options of preparing an audio + frames dataset: both audio recipes are written.

    Attributes:
        fbank_frames: length of the stored fbank in 10 ms frames (cut or zero-padded).
    """

    fbank_frames: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            16 <= self.fbank_frames <= 4096,
            f"--fbank-frames must be in [16, 4096], got {self.fbank_frames}",
        )


@dataclass
class ClipParams:
    """Options of every prepared clip dataset (subclasses set their own ``frames`` default).

    Attributes:
        root: the prepared directory (the ``--out`` of ``mmbalance prepare``).
        frames: frames per clip given to the visual encoder, taken at the centres of equal
            segments of the clip.
        seed: seeds the validation split carved from the training clips (and any other split
            the dataset has to draw).
        val_fraction: share of the training clips held out for validation when the release
            has no validation split.
    """

    root: str | None = None
    frames: int = 3
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        check(1 <= self.frames <= 16, f"dataset.frames must be in [1, 16], got {self.frames}")
        check(
            0 < self.val_fraction < 0.5,
            f"dataset.val_fraction must be in (0, 0.5), got {self.val_fraction}",
        )


@dataclass
class AudioVisualParams(ClipParams):
    """Options of an audio + frames dataset: which of the two prepared audio recipes to use.

    Attributes:
        audio: ``stft`` (OGM-GE's log-STFT spectrogram) or ``fbank`` (the Kaldi-style fbank).
    """

    audio: Literal["stft", "fbank"] = "stft"


@dataclass
class Release:
    """What a dataset found in its raw release: the clips, and how to prepare and file each.

    ``func(*job(clip))`` prepares one clip and returns ``(clip, error or None)``; it must be a
    module-level function, so that worker processes can import it. ``classes`` (label order),
    when given, is written to ``classes.txt`` for datasets whose classes come from the release.
    """

    names: list[str]
    failed: dict[str, str]
    label: Callable[[str], str]
    split: Callable[[str], str]
    job: Callable[[str], tuple[Any, ...]]
    func: Callable[..., JobResult] = prepare_av_clip
    outputs: Callable[[Path, str], list[Path]] = av_outputs
    classes: list[str] | None = None


class ClipSource(DatasetSource):
    """A dataset that ``mmbalance prepare`` decodes once from its raw release (module docstring).

    A subclass sets ``name`` (its registry name), ``title``, ``raw_hint`` (what ``--raw`` names),
    ``version`` (bumped when the prepared layout or the loading changes), ``classes`` when the
    label order is fixed (else ``classes.txt`` of the prepared directory gives it), ``Params``
    and ``PrepareParams``, and implements :meth:`find_clips` (what the release holds) and
    :meth:`bundle` (the prepared arrays as modalities).
    """

    Params: ClassVar[type] = ClipParams
    PrepareParams: ClassVar[type | None] = ClipPrepareParams
    name: ClassVar[str]
    title: ClassVar[str]
    raw_hint: ClassVar[str] = "RAW_DIR"
    version: ClassVar[int] = 1
    classes: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def prepare_hint(cls) -> str:
        return (
            f"run `mmbalance prepare {cls.name} --raw {cls.raw_hint} --out DIR` and set "
            "dataset.root=DIR"
        )

    # ------------------------------------------------------------------ preparation

    @classmethod
    def prepare(
        cls,
        raw: Path,
        out: Path,
        params: Any = None,
        *,
        progress: bool = True,
        console: Any = None,
    ) -> dict[str, Any]:
        """Prepare the release in ``raw`` into ``out``; returns the report.

        ``params`` is a ``PrepareParams`` (its defaults when None). ``workers > 1`` runs spawned
        processes, so a calling script needs the usual ``if __name__ == "__main__":`` guard.
        """
        assert cls.PrepareParams is not None
        params = params if params is not None else cls.PrepareParams()
        raw, out = Path(raw), Path(out)
        if not raw.is_dir():
            raise DataError(
                f"{cls.title} raw directory {raw} does not exist; pass the root of the release"
            )
        release = cls.find_clips(raw, out, params)
        settings = {k: v for k, v in asdict(params).items() if k != "workers"}
        # nothing is written before the release was read and --out is known to be ours
        claim_output(out, "prepared")
        with output_lock(out):
            record_prepare_options(out, cls.name, settings)
            if release.classes is not None:
                write_text_atomic(out / "classes.txt", "\n".join(release.classes) + "\n")
                settings["classes"] = len(release.classes)
            return prepare_clips(
                dataset=cls.name,
                title=cls.title,
                raw=raw,
                out=out,
                release=release,
                workers=params.workers,
                progress=progress,
                console=console,
                settings=settings,
            )

    @classmethod
    def find_clips(
        cls, raw: Path, out: Path, params: Any
    ) -> Release:  # pragma: no cover - abstract
        """The clips of the release in ``raw`` and how to prepare each into ``out``."""
        raise NotImplementedError

    @classmethod
    def print_prepare_report(cls, report: Mapping[str, Any], console: Any) -> None:
        print_report(report, console, cls.title)

    # ------------------------------------------------------------------ loading

    def fingerprint(self) -> str | None:
        """:func:`files_stamp` of the prepared directory (None when none is set): every file's
        size, times and inode, which change whenever the file does. The content hash of the
        stacked arrays is in the bundle's ``details["fingerprint"]``."""
        root = self.params.root
        return files_stamp(Path(root).expanduser().resolve()) if root else None

    def build(self) -> DatasetBundle:
        p: ClipParams = self.params
        hint = self.prepare_hint()
        if not p.root:
            raise DataError(f"dataset.root is not set; {hint}")
        root = Path(p.root).expanduser().resolve()
        rows = read_manifest(root, self.title, hint, self.classes)
        classes = list(self.classes) if self.classes else read_classes(root, rows, hint)
        return self.bundle(root, rows, classes)

    def bundle(
        self, root: Path, rows: Sequence[dict[str, str]], classes: Sequence[str]
    ) -> DatasetBundle:  # pragma: no cover - abstract
        """The prepared directory ``root`` (its manifest ``rows``) as a bundle."""
        raise NotImplementedError

    def test_fraction(self) -> float | None:
        """The share of clips for testing when the manifest gives no split (None: refuse)."""
        return None

    def clip_bundle(
        self,
        root: Path,
        rows: Sequence[dict[str, str]],
        classes: Sequence[str],
        *,
        parts: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
        normalise: Mapping[str, Callable[[Tensor], Tensor]],
        encoders: Mapping[str, str],
        to_tensor: Mapping[str, Callable[[np.ndarray], Tensor]],
        recipe: dict[str, Any],
        notes: str,
    ) -> DatasetBundle:
        """Stack, cache and split the prepared directory ``root`` into a bundle.

        ``parts`` maps each modality to its subdirectory and the check/selection applied to a
        clip's array; ``to_tensor`` turns the stacked arrays into the cached tensors (frames
        stay uint8), ``normalise`` turns a batch of them into model input. The cache is loaded
        memory-mapped and each split is a :class:`ClipDataset` over it, so no split copies or
        converts the frames.
        """
        from mmbalance.data.cache import cached_arrays_and_hash

        p: ClipParams = self.params
        name, title, hint = self.name, self.title, self.prepare_hint()
        # keyed on every file of the directory (its manifest included): a file changed since
        # the cache was built rebuilds it, never reuses stale arrays
        recipe = {
            "dataset": name,
            "root": str(root),
            "files": self.fingerprint(),
            "version": self.version,
            "layout": 2,  # the cache holds each clip's content id
            **recipe,
        }
        lookup = {c: i for i, c in enumerate(classes)}

        def load() -> dict[str, Tensor]:
            stacked = stack_clips(root, rows, name, parts, hint)
            arrays = {m: to_tensor[m](a) for m, a in stacked.items()}
            arrays["targets"] = torch.tensor([lookup[r["label"]] for r in rows], dtype=torch.long)
            arrays["content_ids"] = content_ids(stacked)
            return arrays

        arrays, content = cached_arrays_and_hash(self.cache_dir, name, recipe, load)
        arrays = dict(arrays)
        targets = arrays.pop("targets")
        ids = arrays.pop("content_ids")
        index, note = split_indices(
            rows, targets, p.val_fraction, p.seed, title, self.test_fraction()
        )
        check_disjoint_splits(rows, index, ids, title)
        splits = {s: ClipDataset(arrays, targets, idx, normalise) for s, idx in index.items()}
        specs = {m: ModalitySpec(m, tuple(arrays[m].shape[1:]), encoders[m], {}) for m in parts}
        return DatasetBundle(
            name=name,
            task="classification",
            num_outputs=len(classes),
            modalities=specs,
            splits=splits,
            class_names=list(classes),
            notes=f"{title} prepared in {root} ({notes}); {note}",
            details={"fingerprint": content},
        )


class AudioVisualSource(ClipSource):
    """An audio + RGB-frames dataset prepared by :func:`prepare_av_clip` (CREMA-D, AVE,
    Kinetics-Sounds): one ResNet-18 per modality, frames normalised with ImageNet statistics."""

    Params: ClassVar[type] = AudioVisualParams
    PrepareParams: ClassVar[type | None] = AudioVisualPrepareParams
    #: Seconds of sound in the log-STFT recipe (the sound is tiled or cut to it).
    seconds: ClassVar[float] = 10.0

    @classmethod
    def av_job(
        cls,
        raw: Path,
        out: Path,
        params: AudioVisualPrepareParams,
        media: Callable[[str], tuple[Path | None, Path | None, Path | None]],
    ) -> Callable[[str], tuple[Any, ...]]:
        """A :attr:`Release.job` for :func:`prepare_av_clip`; ``media(clip)`` gives the clip's
        video, WAV file and frame folder (None where the release has none)."""
        return lambda c: (
            c,
            *media(c),
            out,
            params.image_size,
            params.fbank_frames,
            cls.seconds,
            raw,
        )

    def bundle(
        self, root: Path, rows: Sequence[dict[str, str]], classes: Sequence[str]
    ) -> DatasetBundle:
        p: AudioVisualParams = self.params
        return self.clip_bundle(
            root,
            rows,
            classes,
            parts=av_parts(p.audio, p.frames),
            normalise={"video": normalise_rgb},
            encoders={"audio": "resnet18", "video": "resnet18"},
            to_tensor=AV_TO_TENSOR,
            recipe={"audio": p.audio, "frames": p.frames},
            notes=f"audio {p.audio}, {p.frames} frame(s)",
        )
