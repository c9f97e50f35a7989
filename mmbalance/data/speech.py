"""Spoken words from Debian's ``espeak-ng``: voice settings drawn from seeds, synthesised in parallel.

No speech corpus can be downloaded on the project's machines, but espeak-ng speaks any word in
about a hundred voice variants at any speed and pitch, deterministically (same arguments, same
bytes). Each call runs ``espeak-ng --stdout``; the subprocesses run in a thread pool (the work is
in the child processes, so threads suffice) and only distinct utterances are synthesised once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmbalance.errors import DataError

#: English voices and variants that espeak-ng ships (mbrola voices are absent on Debian).
DEFAULT_VOICES: tuple[str, ...] = (
    "en-us",
    "en-us+f3",
    "en-gb+m3",
    "en-gb-scotland+f2",
    "en-us+m7",
    "en-029+f4",
    "en-gb-x-rp+croak",
    "en-us+klatt",
    "en-gb-x-gbclan+m1",
    "en-gb+f5",
    "en-us-nyc+m2",
    "en-gb-x-gbcwmd+f1",
)

INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu)"


@dataclass(frozen=True, order=True)
class Utterance:
    """One espeak-ng call: the text, a voice (``lang+variant``), words per minute and pitch."""

    text: str
    voice: str
    speed: int
    pitch: int


def espeak_binary() -> str:
    """Path of ``espeak-ng``, or a DataError that says how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise DataError(
            f"espeak-ng is not installed but is needed to synthesise speech; {INSTALL_HINT}"
        )
    return path


def draw_utterances(
    texts: Sequence[str],
    seed: int,
    voices: Sequence[str] = DEFAULT_VOICES,
    speed: tuple[int, int] = (110, 200),
    pitch: tuple[int, int] = (20, 80),
) -> list[Utterance]:
    """One utterance per text, with voice, speed and pitch drawn uniformly from ``seed``."""
    rng = np.random.default_rng(seed)
    n = len(texts)
    v = rng.integers(0, len(voices), n)
    s = rng.integers(speed[0], speed[1] + 1, n)
    p = rng.integers(pitch[0], pitch[1] + 1, n)
    return [
        Utterance(t, voices[int(a)], int(b), int(c))
        for t, a, b, c in zip(texts, v, s, p, strict=True)
    ]


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono 16-bit PCM WAV bytes -> (float32 samples in [-1, 1), sample rate).

    espeak-ng's ``--stdout`` header claims chunk sizes of 0x7FFFFFFF because it streams, so the
    ``data`` chunk is taken to run to the end of the bytes rather than trusting its length.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DataError("espeak-ng returned no WAV data; check that `espeak-ng --stdout hi` works")
    pos, rate, bits, channels = 12, 0, 0, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            channels = int.from_bytes(data[body + 2 : body + 4], "little")
            rate = int.from_bytes(data[body + 4 : body + 8], "little")
            bits = int.from_bytes(data[body + 14 : body + 16], "little")
        elif chunk == b"data":
            if rate == 0 or bits != 16 or channels != 1:
                raise DataError(
                    f"espeak-ng WAV is not mono 16-bit PCM (channels={channels}, bits={bits})"
                )
            end = len(data) if size >= len(data) - body else body + size
            end -= (end - body) % 2
            pcm = np.frombuffer(data[body:end], dtype="<i2")
            return pcm.astype(np.float32) / 32768.0, rate
        pos = body + size + (size % 2)
    raise DataError("espeak-ng WAV has no data chunk; check that `espeak-ng --stdout hi` works")


def synthesize_one(utt: Utterance, binary: str | None = None) -> tuple[np.ndarray, int]:
    """Speak one utterance; returns (float32 samples, sample rate)."""
    exe = binary or espeak_binary()
    cmd = [exe, "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch), "--stdout", utt.text]
    try:
        out = subprocess.run(cmd, capture_output=True, check=True, timeout=60)
    except subprocess.CalledProcessError as err:
        msg = err.stderr.decode(errors="replace").strip().splitlines()
        raise DataError(
            f"espeak-ng failed for {utt}: {msg[-1] if msg else err}; check the voice name"
        ) from None
    return parse_wav(out.stdout)


def synthesize(
    utterances: Sequence[Utterance],
    workers: int | None = None,
    description: str = "speech",
) -> dict[Utterance, tuple[np.ndarray, int]]:
    """Speak every distinct utterance once, in parallel, with a progress bar.

    Returns a mapping from utterance to (samples, rate); callers index it per sample.
    """
    exe = espeak_binary()
    unique = sorted(set(utterances))
    workers = workers or min(4, 2 * (os.cpu_count() or 1))
    results: dict[Utterance, tuple[np.ndarray, int]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task(f"espeak-ng {description}", total=len(unique))
        for utt, res in zip(
            unique, pool.map(lambda u: synthesize_one(u, exe), unique), strict=True
        ):
            results[utt] = res
            progress.advance(task)
    return results


def spoken_waveforms(
    utterances: Sequence[Utterance], sample_rate: int, duration: float, description: str = "speech"
) -> np.ndarray:
    """Waveforms ``(N, sample_rate * duration)`` float32: synthesised, resampled, cut or padded."""
    from mmbalance.data.audio import fix_length, resample

    length = round(sample_rate * duration)
    spoken = synthesize(utterances, description=description)
    prepared = {
        u: fix_length(resample(w, sr, sample_rate), length) for u, (w, sr) in spoken.items()
    }
    out = np.empty((len(utterances), length), dtype=np.float32)
    for i, u in enumerate(utterances):
        out[i] = prepared[u]
    return out
