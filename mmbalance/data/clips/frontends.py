"""The papers' audio front-ends on top of :mod:`mmbalance.data.audio`: OGM-GE's log-STFT
spectrogram and the Kaldi-style fbank of OGM-GE's ``process_audio.py``."""

from __future__ import annotations

import numpy as np
import torch

from mmbalance.data.audio import fbank, fix_length, resample, stft_magnitude

STFT_SR, STFT_SECONDS, STFT_NFFT, STFT_HOP = 22050, 3.0, 512, 353


FBANK_SR, FBANK_MELS = 16000, 128


FBANK_MEAN, FBANK_STD = -4.503877, 5.141276


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
