"""Finding and decoding a release's media: WAV files and video audio tracks to mono float
waveforms, video frames at 1 fps or at segment centres (PyAV), image files (frame folders,
optical-flow JPEGs), and the files of a release indexed by name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
