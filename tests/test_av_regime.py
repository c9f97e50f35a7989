"""``av-fashion-cnn``: the competition setting of AV-Fashion (defaults, build, cache, learning)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mmbalance.builder import resolve_config
from mmbalance.data import DATASETS, speech
from mmbalance.data.av_fashion import AVFashionParams, AVFashionSource
from mmbalance.data.av_fashion_cnn import (
    ENCODER,
    ENCODER_PARAMS,
    AVFashionCNNParams,
    AVFashionCNNSource,
)
from mmbalance.errors import ConfigError, DataError

needs_fashion = pytest.mark.skipif(
    not (Path("/usr/share/datasets/fashion-mnist") / "t10k-labels-idx1-ubyte.gz").exists()
    or shutil.which("espeak-ng") is None,
    reason="needs apt-get install dataset-fashion-mnist espeak-ng",
)

TINY = {"n_train": 300, "n_val": 60, "n_test": 200, "n_voices": 4}


def _arrays(source: AVFashionSource) -> dict[str, torch.Tensor]:
    bundle = source.build()
    out = {}
    for split, ds in bundle.splits.items():
        out |= {f"{split}/{m}": x for m, x in ds.inputs.items()}
        out[f"{split}/y"] = ds.targets
    return out


def test_defaults_are_the_searched_setting() -> None:
    """The defaults (data, encoders, recipe) are the candidate that benchmarks/find_av_regime.py
    chose, which ran as ``av-fashion`` with explicit overrides; user values still win."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # ``benchmarks`` is a package of the repository, not installed
        sys.path.insert(0, root)
    from benchmarks.find_av_regime import CANDIDATES, CHOSEN

    assert DATASETS.get("av-fashion-cnn") is AVFashionCNNSource
    chosen = resolve_config(CANDIDATES[CHOSEN].overrides)
    ours = resolve_config({"dataset": "av-fashion-cnn"})
    assert chosen.dataset.name == "av-fashion"
    assert isinstance(chosen.dataset.params, AVFashionParams)
    assert asdict(chosen.dataset.params) == asdict(AVFashionCNNParams())
    assert ours.train == chosen.train
    for m in ("audio", "image"):
        assert chosen.encoders[m].name == ENCODER
        assert chosen.encoders[m].params == ENCODER_PARAMS
    cfg = resolve_config({"dataset": "av-fashion-cnn", "train.epochs": 3, "optimizer": "sgd"})
    assert (cfg.train.epochs, cfg.train.optimizer) == (3, "sgd")
    assert cfg.train.batch_size == ours.train.batch_size


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n_train", 5, "dataset.n_train must be >= 20"),
        ("n_val", 59500, "must be <= 60000"),
        ("n_test", 20000, "dataset.n_test must be in"),
        ("audio_snr_db", 100.0, "dataset.audio_snr_db must be in"),
        ("n_voices", 0, "dataset.n_voices must be in"),
        ("image_pc_removed", 1.0, "dataset.image_pc_removed must be in"),
        ("colour", 1, "unknown dataset.av-fashion-cnn key 'colour'"),
    ],
)
def test_bad_parameters_are_one_line_config_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config({"dataset": "av-fashion-cnn", f"dataset.{key}": value})
    assert "\n" not in str(info.value)


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    p = AVFashionCNNParams(**TINY, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        AVFashionCNNSource(p, tmp_path / "cache").build()


@needs_fashion
def test_build_is_deterministic_cached_and_shared_with_av_fashion(
    tmp_path: Path, monkeypatch
) -> None:
    """Two independent builds are identical; a rebuild reads the cache, which AV-Fashion with the
    same parameters shares; the bundle has conv encoders and the documented shapes."""
    p = AVFashionCNNParams(**TINY)
    first = _arrays(AVFashionCNNSource(p, tmp_path / "a"))
    second = _arrays(AVFashionCNNSource(p, tmp_path / "b"))
    assert first.keys() == second.keys()
    for k in first:
        assert first[k].numpy().tobytes() == second[k].numpy().tobytes(), k
    bundle = AVFashionCNNSource(p, tmp_path / "a").build()
    assert bundle.name == "av-fashion-cnn" and list(bundle.modalities) == ["audio", "image"]
    assert {m: s.shape for m, s in bundle.modalities.items()} == {
        "audio": (1, 32, 51),
        "image": (1, 28, 28),
    }
    for spec in bundle.modalities.values():
        assert (spec.encoder, dict(spec.encoder_params)) == ("resnet18", {"width": 8})
    assert {k: len(ds) for k, ds in bundle.splits.items()} == {"train": 300, "val": 60, "test": 200}
    assert torch.bincount(bundle.splits["train"].targets, minlength=10).tolist() == [30] * 10

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(speech, "synthesize", no_synthesis)
    cached = _arrays(AVFashionCNNSource(p, tmp_path / "a"))
    shared = _arrays(AVFashionSource(AVFashionParams(**asdict(p)), tmp_path / "a"))
    for k in first:
        assert torch.equal(first[k], cached[k]) and torch.equal(first[k], shared[k]), k
    assert len(list((tmp_path / "a").glob("av-fashion-*.pt"))) == 1


@needs_fashion
@pytest.mark.parametrize(("modality", "floor"), [("audio", 0.3), ("image", 0.5)])
def test_each_modality_alone_beats_chance(tmp_path: Path, monkeypatch, modality, floor) -> None:
    """One modality alone, with the dataset's conv encoder, clears chance (0.1) by a margin
    (1000 samples, 3 epochs of batch 32: about 3 s; measured 0.47 audio, 0.67 image)."""
    from mmbalance.train.runner import fit

    monkeypatch.setenv("MMBALANCE_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(
        {
            "dataset": "av-fashion-cnn",
            **{f"dataset.{k}": v for k, v in TINY.items()},
            "dataset.n_train": 1000,
            "method": "unimodal",
            "method.modality": modality,
            "train.epochs": 3,
            "train.batch_size": 32,
            "train.progress": False,
            "train.tensorboard": False,
            "train.epoch_curves": False,
        }
    )
    acc = fit(cfg, tmp_path / "run").metrics["test"]["accuracy"]
    assert acc > floor, acc
