"""``av-fashion``: real Fashion-MNIST images paired with spoken class names, with imbalance knobs.

Images come from Debian's ``dataset-fashion-mnist`` (the real 60k + 10k 28x28 images); audio is
espeak-ng speaking the class name ("t-shirt", "trouser", ...). Speaking 70k distinct utterances
would take minutes, so each class gets a pool of ``n_voices`` voice settings (voice, speed,
pitch drawn from ``seed``) and each sample draws one of them: ``n_voices`` is the voice variety.

Degradation knobs make the imbalance between the modalities tunable:

- ``image_pc_removed``: the fraction of image variance removed by projecting out the leading
  principal components (fitted on the training subset), which deletes coarse shape and leaves
  fine detail;
- ``image_noise``: std of additive Gaussian pixel noise (pixels in [0, 1]);
- ``audio_snr_db``: white noise on the waveform at this SNR (null: clean);
- ``n_voices``: voice settings per class (more settings, more varied speech).

The default subset (5000 train, 1000 validation from the official training set; 2000 test from
the official test set) trains one run of the default MLP encoders in about 5 s on 2 idle CPU cores
(a minute or more when the cores are shared); raise ``n_train`` for a harder benchmark.
The default degradation (``audio_snr_db=-18``, images untouched) keeps both modalities
informative and neither near perfect, with the image clearly the stronger one. Measured test
accuracies (seeds 0 and 1): audio alone 0.38 / 0.40, image alone 0.83 / 0.83, joint 0.86 / 0.88.
At ``audio_snr_db=-12`` the audio alone reaches 0.81, level with the image (joint 0.95).
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.data.audio import add_noise_snr, log_mel
from mmbalance.data.av_digits import AudioRecipe, audio_image_bundle
from mmbalance.data.base import (
    DATASETS,
    DatasetBundle,
    DatasetSource,
    error_text,
    stratified_split,
)
from mmbalance.data.cache import cached_arrays
from mmbalance.data.speech import draw_utterances, spoken_waveforms
from mmbalance.errors import DataError
from mmbalance.io import open_regular

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_WORDS = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
VERSION = 1


#: The largest Fashion-MNIST file once decompressed (the training images are 47 MB).
_MAX_IDX_BYTES = 64 << 20


def _idx(path: Path, offset: int) -> np.ndarray:
    """The items of a gzipped IDX file (``offset``: its header's length), checked against its
    header: a truncated, corrupt or oversized file, or one that is not a regular file, is a
    one-line :class:`DataError`."""
    if not path.exists():
        raise DataError(
            f"Fashion-MNIST file {path} is missing; install it with "
            "`apt-get install dataset-fashion-mnist` or set dataset.data_dir"
        )

    def corrupt(why: str) -> DataError:
        return DataError(
            f"Fashion-MNIST file {path} is corrupt ({why}); reinstall dataset-fashion-mnist"
        )

    try:
        with open_regular(path) as raw, gzip.GzipFile(fileobj=raw) as f:
            data = f.read(_MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise corrupt(error_text(err)) from None
    if len(data) > _MAX_IDX_BYTES:
        raise corrupt("larger than any Fashion-MNIST file")
    dims = (offset - 4) // 4  # the header: magic number, then one count per dimension
    if len(data) < offset or data[:4] != bytes([0, 0, 8, dims]):
        raise corrupt("not an IDX file of unsigned bytes")
    counts = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    if len(data) != offset + math.prod(counts):
        raise corrupt(f"{len(data) - offset} bytes of data for a header of {counts}")
    return np.frombuffer(data, np.uint8, offset=offset)


@lru_cache(maxsize=2)
def load_fashion_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official splits: ``{"train": (60000x28x28 uint8, labels), "test": (10000x..., ...)}``.

    Kept in memory per process (read-only arrays), since rebuilding with other knobs re-reads them.
    """
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = _idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"Fashion-MNIST {split} has {len(x)} images but {len(y)} labels")
        out[split] = (x, y)
    return out


@dataclass
class AVFashionParams(AudioRecipe):
    """Options of AV-Fashion (all of them are part of the cache key).

    Attributes:
        n_voices: spoken versions (voice, speed, pitch) of each class name; every sample draws
            one, so more voices means more varied speech.
        image_noise: standard deviation of the Gaussian noise added to the pixels (in [0, 1]).
        image_pc_removed: share of the image variance removed by projecting out the leading
            principal components (fitted on the training subset): a weaker image modality.
        n_train: training samples, from the official training set.
        n_val: validation samples, from the official training set (disjoint from n_train).
        n_test: test samples, from the official test set.
        seed: draws the subsets, the voices and the noise.
        data_dir: directory of the Fashion-MNIST ``*-idx?-ubyte.gz`` files (Debian package
            dataset-fashion-mnist).
    """

    audio_snr_db: float | None = -18.0
    n_voices: int = 50
    image_noise: float = 0.0
    image_pc_removed: float = 0.0
    n_train: int = 5000
    n_val: int = 1000
    n_test: int = 2000
    seed: int = 0
    data_dir: str = str(FASHION_DIR)

    def __post_init__(self) -> None:
        self.check_audio()
        check(
            1 <= self.n_voices <= 2000,
            f"dataset.n_voices must be in [1, 2000], got {self.n_voices}",
        )
        check(
            0 <= self.image_noise <= 5,
            f"dataset.image_noise must be in [0, 5], got {self.image_noise}",
        )
        check(
            0 <= self.image_pc_removed < 1,
            f"dataset.image_pc_removed must be in [0, 1), got {self.image_pc_removed}",
        )
        check(self.n_train >= 20, f"dataset.n_train must be >= 20, got {self.n_train}")
        check(self.n_val >= 10, f"dataset.n_val must be >= 10, got {self.n_val}")
        check(
            self.n_train + self.n_val <= 60000,
            "dataset.n_train + dataset.n_val must be <= 60000 (the official training set)",
        )
        check(
            10 <= self.n_test <= 10000, f"dataset.n_test must be in [10, 10000], got {self.n_test}"
        )


def remove_pc_energy(train: Tensor, others: list[Tensor], fraction: float) -> list[Tensor]:
    """Project out the fewest leading principal components holding ``fraction`` of the variance."""
    flat = train.flatten(1).double()
    mean = flat.mean(0)
    _, s, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    share = (s**2).cumsum(0) / (s**2).sum()
    k = int(torch.searchsorted(share, torch.tensor(fraction, dtype=share.dtype)).item()) + 1
    basis = vh[:k]
    out = []
    for x in [train, *others]:
        centred = x.flatten(1).double() - mean
        kept = centred - (centred @ basis.T) @ basis + mean
        out.append(kept.reshape(x.shape).float())
    return out


def build_fashion_arrays(p: AVFashionParams) -> dict[str, Tensor]:
    """Subsets, degraded images, spoken class names as log-mels (deterministic in ``p``)."""
    data = load_fashion_mnist(Path(p.data_dir))
    xtr, ytr = (torch.from_numpy(a.copy()) for a in data["train"])
    xte, yte = (torch.from_numpy(a.copy()) for a in data["test"])
    n_pool = len(ytr)
    train_idx, val_idx = stratified_split(ytr, [p.n_train / n_pool, p.n_val / n_pool], seed=p.seed)
    (test_idx,) = stratified_split(yte, [p.n_test / len(yte)], seed=p.seed + 1)
    images = {
        "train": xtr[train_idx].float().div(255).unsqueeze(1),
        "val": xtr[val_idx].float().div(255).unsqueeze(1),
        "test": xte[test_idx].float().div(255).unsqueeze(1),
    }
    targets = {"train": ytr[train_idx], "val": ytr[val_idx], "test": yte[test_idx]}
    if p.image_pc_removed > 0:
        tr, va, te = remove_pc_energy(
            images["train"], [images["val"], images["test"]], p.image_pc_removed
        )
        images = {"train": tr, "val": va, "test": te}
    gen = torch.Generator().manual_seed(p.seed + 104729)
    if p.image_noise > 0:
        images = {
            k: v + p.image_noise * torch.randn(v.shape, generator=gen) for k, v in images.items()
        }

    # A pool of n_voices spoken versions of each class name; every sample picks one.
    assert p.voices is not None
    pool_texts = [w for w in CLASS_WORDS for _ in range(p.n_voices)]
    utts = draw_utterances(
        pool_texts, p.seed, p.voices, (p.speed_min, p.speed_max), (p.pitch_min, p.pitch_max)
    )
    pool = torch.from_numpy(spoken_waveforms(utts, p.sample_rate, p.duration, "av-fashion"))
    arrays: dict[str, Tensor] = {}
    for split in ("train", "val", "test"):
        y = targets[split]
        choice = torch.randint(p.n_voices, (len(y),), generator=gen)
        mels = []
        for rows in (y * p.n_voices + choice).split(1024):
            waves = pool[rows]
            if p.audio_snr_db is not None:
                waves = add_noise_snr(waves, p.audio_snr_db, gen)
            mels.append(log_mel(waves, p.sample_rate, p.n_fft, p.hop, p.n_mels))
        arrays[f"{split}/audio"] = torch.cat(mels).unsqueeze(1).float().contiguous()
        arrays[f"{split}/image"] = images[split].contiguous()
        arrays[f"{split}/targets"] = y.contiguous()
    return arrays


@DATASETS.register("av-fashion")
class AVFashionSource(DatasetSource):
    Params = AVFashionParams
    description = "Fashion-MNIST + espeak-ng spoken class names, with per-modality degradation"
    train_defaults = {"optimizer": "adam", "lr": 1e-3, "epochs": 10, "batch_size": 128}

    def build(self) -> DatasetBundle:
        p: AVFashionParams = self.params
        recipe = {"dataset": "av-fashion", "version": VERSION, **asdict(p)}
        arrays = cached_arrays(
            self.cache_dir, "av-fashion", recipe, lambda: build_fashion_arrays(p)
        )
        splits = ("train", "val", "test")
        return audio_image_bundle(
            "av-fashion",
            {s: arrays[f"{s}/audio"] for s in splits},
            {s: arrays[f"{s}/image"] for s in splits},
            {s: arrays[f"{s}/targets"] for s in splits},
            class_names=list(CLASS_WORDS),
            image_hidden=256,
            notes=(
                f"Fashion-MNIST subset {p.n_train}/{p.n_val}/{p.n_test} (train/val from the "
                f"official training set), espeak-ng class names with {p.n_voices} voices per class"
            ),
        )
