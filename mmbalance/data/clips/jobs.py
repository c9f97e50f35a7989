"""Preparing a release: one job per clip, run in parallel with a progress bar; a job never
raises but returns an error string, so one corrupt file is skipped and reported instead of
stopping a run of thousands; then ``manifest.csv`` and ``prepare_report.json``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from mmbalance.data.base import (
    error_text,
)
from mmbalance.data.clips.decode import (
    decode_frames,
    image_files,
    read_audio_track,
    read_images,
    read_wav,
)
from mmbalance.data.clips.frontends import fbank_features, stft_features
from mmbalance.data.clips.prepared import save_npy, write_manifest
from mmbalance.errors import DataError
from mmbalance.io import is_written_file, make_dir, write_text_atomic

#: A preparation job's result: ``(clip, error or None)``.
JobResult = tuple[str, str | None]


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


def print_report(report: Mapping[str, Any], console: Any, title: str) -> None:
    """The end-of-run summary: counts, then one line per skipped clip."""
    console.print(
        f"[bold]{title}[/bold]: {report['clips_found']} clips found, "
        f"{report['prepared_now']} prepared now, {report['already_prepared']} already prepared, "
        f"{report['in_manifest']} in manifest.csv, {len(report['failed'])} skipped"
    )
    for item in report["failed"]:
        console.print(f"  skipped {item['clip']}: {item['reason']}", markup=False)
