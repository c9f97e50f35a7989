"""AV-Digits and its pieces: WAV parsing, the STFT/mel front-end, the cache, the build, learning."""

from __future__ import annotations

import math
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbalance.data import audio, cache, speech
from mmbalance.data.av_digits import AVDigitsParams, AVDigitsSource
from mmbalance.errors import ConfigError, DataError

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng missing (apt-get install espeak-ng)"
)

SMALL = {"max_samples": 200}


def _arrays(source: AVDigitsSource) -> dict[str, torch.Tensor]:
    bundle = source.build()
    out = {}
    for split, ds in bundle.splits.items():
        for m, x in ds.inputs.items():
            out[f"{split}/{m}"] = x
        out[f"{split}/y"] = ds.targets
    return out


def test_parse_wav_ignores_streaming_sizes() -> None:
    """espeak-ng --stdout writes 0x7FFFFFFF chunk sizes; the samples must still come back exact."""
    pcm = np.array([0, 1000, -1000, 32767, -32768], dtype="<i2")
    fmt = struct.pack("<HHIIHH", 1, 1, 22050, 44100, 2, 16)
    data = (
        b"RIFF"
        + struct.pack("<I", 0x7FFFFFFF)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", 0x7FFFFFFF)
        + pcm.tobytes()
    )
    wave, rate = speech.parse_wav(data)
    assert rate == 22050
    np.testing.assert_array_equal(wave, pcm.astype(np.float32) / 32768.0)
    with pytest.raises(DataError, match="no WAV data"):
        speech.parse_wav(b"not a wav file")


def test_stft_and_mel_match_numpy_reference() -> None:
    """torch.stft front-end equals a direct numpy STFT (centred, reflect, periodic Hann)."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal(4000).astype(np.float64)
    n_fft, hop = 256, 100
    padded = np.pad(y, n_fft // 2, mode="reflect")
    frames = 1 + (len(padded) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    ref = np.abs(np.fft.rfft(padded[idx] * np.hanning(n_fft + 1)[:-1], axis=1)).T
    got = audio.stft_magnitude(torch.from_numpy(y), n_fft, hop).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
    fb = audio.mel_filterbank(16000, 400, 32)
    assert fb.shape == (32, 201) and (fb >= 0).all() and (fb.amax(1) > 0.5).all()
    # A pure tone lands in the mel band containing its frequency.
    t = torch.arange(16000) / 16000
    mel = audio.log_mel(torch.sin(2 * torch.pi * 1000 * t), 16000, n_mels=32)
    centers = audio.mel_to_hz(np.linspace(0, audio.hz_to_mel(8000), 34))[1:-1]
    assert abs(centers[int(mel.mean(1).argmax())] - 1000) < 150
    assert audio.fbank(torch.randn(2, 16000), 16000).shape == (2, 98, 40)


def test_bad_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="audio_snr_db"):
        AVDigitsParams(audio_snr_db=100.0)
    with pytest.raises(ConfigError, match="speed"):
        AVDigitsParams(speed_min=300, speed_max=200)
    with pytest.raises(ConfigError, match="max_samples"):
        AVDigitsParams(max_samples=5)


def test_missing_espeak_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install espeak-ng"):
        AVDigitsSource(AVDigitsParams(**SMALL), tmp_path / "cache").build()


@needs_espeak
def test_build_is_deterministic_and_cached(tmp_path: Path, monkeypatch) -> None:
    """Two independent builds are identical byte for byte; a second build reads the cache."""
    p = AVDigitsParams(**SMALL)
    first = _arrays(AVDigitsSource(p, tmp_path / "a"))
    second = _arrays(AVDigitsSource(p, tmp_path / "b"))
    assert first.keys() == second.keys()
    for k in first:
        assert first[k].numpy().tobytes() == second[k].numpy().tobytes(), k
    bundle = AVDigitsSource(p, tmp_path / "a").build()
    assert list(bundle.modalities) == ["audio", "image"]
    sizes = {k: len(ds) for k, ds in bundle.splits.items()}
    assert abs(sum(sizes.values()) - 200) <= 5 and abs(sizes["train"] - 140) <= 5
    counts = torch.bincount(bundle.splits["train"].targets, minlength=10)
    assert counts.max() - counts.min() <= 1  # stratified
    # The audio carries speech, not silence: spectra differ between samples.
    assert first["train/audio"].std(0).mean() > 0.1

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(speech, "synthesize", no_synthesis)
    cached = _arrays(AVDigitsSource(p, tmp_path / "a"))
    for k in first:
        assert torch.equal(first[k], cached[k]), k


@needs_espeak
def test_recipe_change_and_corruption_rebuild(tmp_path: Path) -> None:
    p = AVDigitsParams(**SMALL)
    base = _arrays(AVDigitsSource(p, tmp_path))
    files = sorted(tmp_path.glob("av-digits-*.pt"))
    assert len(files) == 1
    # A different recipe gets its own file and different audio.
    other = _arrays(AVDigitsSource(replace(p, audio_snr_db=None), tmp_path))
    assert len(list(tmp_path.glob("av-digits-*.pt"))) == 2
    assert not torch.equal(base["train/audio"], other["train/audio"])
    # Corrupt bytes inside the stored arrays: the build notices and rebuilds the same data.
    raw = bytearray(files[0].read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    recipe_key = files[0]
    rebuilt = _arrays(AVDigitsSource(p, tmp_path))
    for k in base:
        assert torch.equal(base[k], rebuilt[k]), k
    blob = torch.load(recipe_key, weights_only=True)
    assert cache.content_hash(blob["arrays"]) == blob["content_hash"]
    # A truncated file is rebuilt too.
    recipe_key.write_bytes(recipe_key.read_bytes()[:100])
    assert torch.equal(_arrays(AVDigitsSource(p, tmp_path))["test/audio"], base["test/audio"])
    assert not list(tmp_path.glob(".*.tmp"))


@needs_espeak
@pytest.mark.parametrize(("modality", "floor"), [("audio", 0.3), ("image", 0.7)])
def test_each_modality_alone_beats_chance(tmp_path: Path, monkeypatch, modality, floor) -> None:
    """A unimodal model on the default recipe (500 samples) clears chance (0.1) by a margin."""
    from mmbalance.builder import resolve_config
    from mmbalance.train import fit

    monkeypatch.setenv("MMBALANCE_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(
        {
            "dataset": "av-digits",
            "dataset.max_samples": 600,
            "method": "unimodal",
            "method.modality": modality,
            "train.epochs": 10,
            "train.progress": False,
            "train.tensorboard": False,
        }
    )
    acc = fit(cfg, tmp_path / "run").metrics["test"]["accuracy"]
    assert acc > floor, acc


needs_fashion = pytest.mark.skipif(
    not (Path("/usr/share/datasets/fashion-mnist") / "t10k-labels-idx1-ubyte.gz").exists()
    or shutil.which("espeak-ng") is None,
    reason="needs apt-get install dataset-fashion-mnist espeak-ng",
)


def test_av_fashion_missing_data_says_how_to_install(tmp_path: Path) -> None:
    from mmbalance.data.av_fashion import AVFashionParams, AVFashionSource

    p = AVFashionParams(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        AVFashionSource(p, tmp_path / "cache").build()
    with pytest.raises(ConfigError, match="image_pc_removed"):
        AVFashionParams(image_pc_removed=1.5)


@needs_fashion
def test_av_fashion_is_deterministic_and_knobs_degrade(tmp_path: Path) -> None:
    """Tiny builds: identical twice; PC removal and noise change the images as specified."""
    from mmbalance.data.av_fashion import AVFashionParams, AVFashionSource, build_fashion_arrays

    tiny = {"n_train": 200, "n_val": 50, "n_test": 100, "n_voices": 3}
    p = AVFashionParams(**tiny)
    a = _arrays(AVFashionSource(p, tmp_path / "a"))
    b = _arrays(AVFashionSource(p, tmp_path / "b"))
    for k in a:
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert a["train/audio"].shape == (200, 1, 32, 51) and a["test/image"].shape == (100, 1, 28, 28)
    assert torch.bincount(a["train/y"], minlength=10).tolist() == [20] * 10
    clean = build_fashion_arrays(p)["train/image"]
    removed = build_fashion_arrays(replace(p, image_pc_removed=0.5))["train/image"]
    # Removing half the variance leaves (a little over) half of it, in the training split.
    left = removed.flatten(1).var(0).sum() / clean.flatten(1).var(0).sum()
    assert 0.3 < left <= 0.5 + 1e-4, left
    noisy = build_fashion_arrays(replace(p, image_noise=0.3))["train/image"]
    assert abs((noisy - clean).std().item() - 0.3) < 0.01


def test_fbank_window_is_kaldis_hanning_by_default() -> None:
    n = 400
    i = torch.arange(n, dtype=torch.float64)
    expected = 0.5 - 0.5 * torch.cos(2 * math.pi * i / (n - 1))
    torch.testing.assert_close(audio.kaldi_window("hanning", n, torch.float64), expected)
    torch.testing.assert_close(audio.kaldi_window("povey", n, torch.float64), expected**0.85)
    wave = torch.randn(8000, dtype=torch.float64)
    default = audio.fbank(wave, 16000)
    torch.testing.assert_close(default, audio.fbank(wave, 16000, window="hanning"))
    assert not torch.allclose(default, audio.fbank(wave, 16000, window="hamming"))
    with pytest.raises(ConfigError, match="unknown fbank window 'blackman'"):
        audio.fbank(wave, 16000, window="blackman")
