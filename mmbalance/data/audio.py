"""Audio front-end: resampling, STFT, log-mel and Kaldi-style fbank features in plain torch.

torchaudio and librosa cannot be used with the project's CPU torch (torchaudio's binary needs CUDA
libraries; librosa spends seconds compiling with numba), so the few transforms the datasets need
are written here on top of ``torch.stft``. The STFT follows librosa's conventions (centred frames,
reflect padding, periodic Hann window); the mel scale is HTK's, with triangular filters.
All functions accept a batch of waveforms ``(..., samples)`` so a whole dataset is one call.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from mmbalance.errors import ConfigError


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Polyphase resampling (exact rational ratio, e.g. 22050 -> 16000 is 320/441)."""
    if orig_sr == new_sr:
        return wave.astype(np.float32, copy=False)
    g = math.gcd(orig_sr, new_sr)
    from scipy.signal import resample_poly  # imported here: 0.5 s at start-up

    return resample_poly(wave, new_sr // g, orig_sr // g).astype(np.float32)


def fix_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Cut or zero-pad at the end to exactly ``length`` samples (utterances start at 0)."""
    out = np.zeros(length, dtype=np.float32)
    n = min(length, len(wave))
    out[:n] = wave[:n]
    return out


def add_noise_snr(wave: Tensor, snr_db: float, generator: torch.Generator) -> Tensor:
    """Add white Gaussian noise at ``snr_db`` relative to each waveform's mean power.

    The power is measured over the samples above 1 % of the peak, i.e. over the speech rather
    than the trailing zero padding, so the SNR means the same for short and long words.
    """
    peak = wave.abs().amax(-1, keepdim=True).clamp_min(1e-8)
    active = (wave.abs() > 0.01 * peak).to(wave.dtype)
    power = (wave.square() * active).sum(-1, keepdim=True) / active.sum(-1, keepdim=True).clamp_min(
        1
    )
    noise_power = power / (10.0 ** (snr_db / 10.0))
    noise = torch.randn(wave.shape, generator=generator, dtype=wave.dtype)
    return wave + noise * noise_power.sqrt()


def stft_magnitude(
    wave: Tensor, n_fft: int, hop: int, window: str = "hann", power: float = 1.0
) -> Tensor:
    """``|STFT|**power`` of ``(..., samples)`` -> ``(..., n_fft // 2 + 1, frames)``.

    Centred frames with reflect padding, so ``frames = 1 + samples // hop``.
    """
    if n_fft < 2 or hop < 1:
        raise ConfigError(f"stft needs n_fft >= 2 and hop >= 1, got n_fft={n_fft}, hop={hop}")
    if window == "hann":
        win = torch.hann_window(n_fft, periodic=True, dtype=wave.dtype)
    elif window == "hamming":
        win = torch.hamming_window(n_fft, periodic=True, dtype=wave.dtype)
    else:
        raise ConfigError(f"unknown window {window!r}; allowed: hann, hamming")
    lead = wave.shape[:-1]
    spec = torch.stft(
        wave.reshape(-1, wave.shape[-1]),
        n_fft,
        hop_length=hop,
        window=win,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    mag = spec.abs()
    if power != 1.0:
        mag = mag.pow(power)
    return mag.reshape(*lead, *mag.shape[-2:])


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def _mel_filterbank_np(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower = (freqs[None, :] - hz[:-2, None]) / (hz[1:-1, None] - hz[:-2, None])
    upper = (hz[2:, None] - freqs[None, :]) / (hz[2:, None] - hz[1:-1, None])
    return np.clip(np.minimum(lower, upper), 0.0, None)


def mel_filterbank(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> Tensor:
    """Triangular HTK-mel filters ``(n_mels, n_fft // 2 + 1)`` spanning ``[fmin, fmax]``."""
    fmax = sr / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sr / 2:
        raise ConfigError(f"mel range must satisfy 0 <= fmin < fmax <= sr/2, got {fmin}, {fmax}")
    if n_mels < 1:
        raise ConfigError(f"n_mels must be >= 1, got {n_mels}")
    return torch.from_numpy(_mel_filterbank_np(sr, n_fft, n_mels, float(fmin), float(fmax))).float()


def log_mel(
    wave: Tensor, sr: int, n_fft: int = 400, hop: int = 160, n_mels: int = 40, eps: float = 1e-6
) -> Tensor:
    """Log mel power spectrogram ``(..., n_mels, frames)`` (librosa-style STFT, HTK mel)."""
    power = stft_magnitude(wave, n_fft, hop, power=2.0)
    return torch.log(mel_filterbank(sr, n_fft, n_mels).to(power.dtype) @ power + eps)


def kaldi_window(name: str, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kaldi's symmetric analysis windows (``0.5 - 0.5 cos(2 pi n / (N - 1))`` for hanning)."""
    if name == "hanning":
        return torch.hann_window(length, periodic=False, dtype=dtype)
    if name == "hamming":
        return torch.hamming_window(length, periodic=False, dtype=dtype)
    if name == "povey":
        return torch.hann_window(length, periodic=False, dtype=dtype).pow(0.85)
    raise ConfigError(f"unknown fbank window {name!r}; allowed: hanning, hamming, povey")


def fbank(
    wave: Tensor,
    sr: int,
    n_mels: int = 40,
    frame_ms: float = 25.0,
    shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    window: str = "hanning",
) -> Tensor:
    """Kaldi-style filterbank energies ``(..., frames, n_mels)``: the features speech models use.

    Per frame: remove the DC offset, apply pre-emphasis and a window, take the power spectrum
    (FFT size the next power of two), then log mel energies from 20 Hz. Frames are not centred
    (Kaldi's ``snip_edges``), so ``frames = 1 + (samples - frame) // shift``.

    ``window`` follows Kaldi's names: ``hanning`` (symmetric Hann; the default, because the
    community's audio-visual fbank recipe asks for it), ``hamming`` or ``povey`` (Kaldi's own
    default, Hann to the power 0.85).
    """
    frame = round(sr * frame_ms / 1000)
    shift = round(sr * shift_ms / 1000)
    if wave.shape[-1] < frame:
        raise ConfigError(f"fbank needs at least {frame} samples, got {wave.shape[-1]}")
    n_fft = 1 << (frame - 1).bit_length()
    frames = wave.unfold(-1, frame, shift)  # (..., T, frame)
    frames = frames - frames.mean(-1, keepdim=True)
    frames = torch.cat(
        [frames[..., :1] * (1 - preemphasis), frames[..., 1:] - preemphasis * frames[..., :-1]], -1
    )
    frames = frames * kaldi_window(window, frame, wave.dtype)
    power = torch.fft.rfft(frames, n=n_fft).abs().square()
    fb = mel_filterbank(sr, n_fft, n_mels, fmin=20.0).to(power.dtype)
    return torch.log((power @ fb.T).clamp_min(torch.finfo(wave.dtype).eps))
