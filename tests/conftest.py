"""Shared fixtures: small, fast settings of the synthetic benchmark."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 480,
    "dataset.n_val": 300,
    "dataset.n_test": 1000,
    "dataset.n_bayes": 4000,
    "train.epochs": 6,
    "train.progress": False,
    "train.tensorboard": False,
}

#: The tiniest synthetic run (one epoch, no curves, nothing shown): for tests of plumbing.
TINY: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 96,
    "dataset.n_val": 64,
    "dataset.n_test": 64,
    "dataset.n_bayes": 100,
    "train.epochs": 1,
    "train.batch_size": 32,
    "train.progress": False,
    "train.tensorboard": False,
    "train.epoch_curves": False,
}

#: The same small synthetic run as command-line ``key=value`` arguments (two epochs).
FAST_ARGS: list[str] = [
    "dataset.n_train=240",
    "dataset.n_val=200",
    "dataset.n_test=400",
    "dataset.n_bayes=2000",
    "train.epochs=2",
    "train.progress=false",
    "train.tensorboard=false",
]


def fit_killed_and_resumed(
    cfg: Any, run_dir: Path, monkeypatch: pytest.MonkeyPatch, after_epoch: int
) -> Any:
    """Train ``cfg`` into ``run_dir``, killed (``KeyboardInterrupt``) right after epoch
    ``after_epoch`` (0-based) has written its metrics and checkpoint, then resume it to the end;
    returns the resumed run's result, to compare with an uninterrupted run."""
    from mmbalance.train import fit
    from mmbalance.train.callbacks import MetricsFiles

    original = MetricsFiles.on_epoch_end

    def killed(self: Any, trainer: Any, row: Any) -> None:
        original(self, trainer, row)
        if row["epoch"] == after_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsFiles, "on_epoch_end", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, run_dir)
    monkeypatch.setattr(MetricsFiles, "on_epoch_end", original)
    return fit(cfg, run_dir, resume=True)


@pytest.fixture
def small() -> dict[str, Any]:
    """Overrides for a synthetic run that trains in about a second."""
    return dict(SMALL)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMBALANCE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# The ``competition`` preset of the synthetic benchmark (m1 easy, m2 informative but hard): joint
# training leaves the m2 encoder under-trained, so balancing methods have room to show a gain.
COMPETITION: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.preset": "competition",
    "dataset.n_test": 2000,
    "dataset.n_bayes": 1000,
    "train.progress": False,
    "train.tensorboard": False,
}


#: A short run of the competition preset (3 epochs, a few hundred samples, no curves), for the
#: per-method learning and resumption tests.
LEARN: dict[str, Any] = {
    **COMPETITION,
    "dataset.n_train": 300,
    "dataset.n_val": 100,
    "dataset.n_test": 300,
    "dataset.n_bayes": 500,
    "train.epochs": 3,
    "train.epoch_curves": False,
}
#: A slightly longer one (4 epochs) with the per-epoch curves on.
SMALL_COMPETITION: dict[str, Any] = {
    **COMPETITION,
    "dataset.n_train": 300,
    "dataset.n_val": 200,
    "dataset.n_test": 400,
    "dataset.n_bayes": 500,
    "train.epochs": 4,
}


#: The competition preset at 400 training samples, for the per-method learning tests.
COMPETITION_400: dict[str, Any] = {
    **COMPETITION,
    "dataset.n_train": 400,
    "dataset.n_val": 200,
    "dataset.n_test": 1000,
    "train.epoch_curves": False,
}
#: Sizes and length of the ``competition_metrics`` learning tests of the scheduled methods.
SCHEDULED_LEARN: dict[str, Any] = {
    "dataset.n_train": 400,
    "dataset.n_val": 300,
    "dataset.n_test": 500,
    "train.epochs": 6,
}


def without_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.csv`` rows without the wall-clock column (the rest must match exactly)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture
def competition_metrics(tmp_path):
    """``run(overrides, seeds)``: test metrics averaged over ``train.seed`` in ``seeds``."""
    from mmbalance.builder import resolve_config
    from mmbalance.train import fit

    def run(overrides: dict[str, Any], seeds: tuple[int, ...] = (0, 1)) -> dict[str, float]:
        label = "_".join(f"{v}" for v in overrides.values())
        runs = [
            fit(
                resolve_config({**COMPETITION, **overrides, "train.seed": s}),
                tmp_path / f"{label}_seed{s}",
            ).metrics["test"]
            for s in seeds
        ]
        return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}

    return run


#: A small multiloss run for the method-interface tests that drive the real trainer.
HOOKS_BASE: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset.n_train": 240,
    "dataset.n_val": 120,
    "dataset.n_test": 200,
    "dataset.n_bayes": 1000,
    "method": "multiloss",
    "train.epochs": 3,
    "train.batch_size": 32,
    "train.optimizer": "adam",
    "train.progress": False,
    "train.tensorboard": False,
    "train.epoch_curves": False,
}


def build_trainer(
    cfg: Any, out: Path, method: Any = None, callbacks: Any = None, data: Any = None
) -> Any:
    """A real :class:`~mmbalance.train.Trainer` of the resolved config ``cfg`` (seeded as ``fit``
    seeds it; no unimodal pre-training), for ``method`` (default: the config's), ``callbacks``
    (default: the config's, as ``fit`` hands them) and ``data`` (default: the config's dataset),
    without running it."""
    from mmbalance.builder import build_dataset, build_model, make_fabric, model_info
    from mmbalance.methods import METHODS
    from mmbalance.train import Trainer
    from mmbalance.train.callbacks import default_callbacks

    fabric = make_fabric(cfg)
    fabric.seed_everything(cfg.train.seed, verbose=False)
    if data is None:
        data = build_dataset(cfg)
    if method is None:
        method = METHODS.get(cfg.method.name)(cfg.method.params)
    model = build_model(cfg, data, method)
    method_module = method.setup(model_info(model, data))
    if callbacks is None:
        callbacks = default_callbacks(cfg)
    return Trainer(fabric, cfg, data, model, method, method_module, out, callbacks=callbacks)


def make_trainer(method: Any, out: Path, **overrides: Any) -> Any:
    """A real :class:`~mmbalance.train.Trainer` for ``method`` on :data:`HOOKS_BASE`, without
    running it."""
    from mmbalance.builder import resolve_config

    return build_trainer(resolve_config({**HOOKS_BASE, **overrides}), out, method)


@pytest.fixture
def restore_registries():
    """Unregister whatever a test registers (plugins, or a user's objects given to the Python
    API), so that the registries of later tests hold the built-ins only."""
    from mmbalance import plugins
    from mmbalance.registry import BUILTIN, all_registries

    before = {id(r): set(r.names()) for r in all_registries()}
    yield
    plugins.reset()
    for registry in all_registries():  # built-ins first loaded during the test stay
        for name in set(registry.names()) - before.get(id(registry), set()):
            if registry.origin(name) != BUILTIN:
                registry.unregister(name)


#: One quiet epoch, as command-line arguments, for the runs of the features dataset's tests.
FEATURES_TINY: list[str] = [
    "train.progress=false",
    "train.tensorboard=false",
    "train.epoch_curves=false",
    "train.epochs=1",
    "train.batch_size=32",
]


def feature_arrays(n: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    """Two modalities (a vector and a sequence) that both carry the label, labels {3, 7, 9}."""
    rng = np.random.default_rng(seed)
    y = np.array([3, 7, 9])[rng.integers(0, 3, n)]
    code = (y == 7) * 1.0 + (y == 9) * 2.0
    return {
        "image": (rng.normal(size=(n, 6)) * 3 + 5 + code[:, None]).astype(np.float32),
        "audio": (rng.normal(size=(n, 4, 3)) + code[:, None, None]).astype(np.float32),
        "y": y,
    }


#: A tiny synthetic run as ``key=value`` arguments: three steps, one epoch, no curves.
TINY_RUN_ARGS: list[str] = [
    "--dataset",
    "synthetic",
    "dataset.n_train=96",
    "dataset.n_val=64",
    "dataset.n_test=64",
    "dataset.n_bayes=100",
    "train.epochs=1",
    "train.batch_size=32",
    "train.progress=false",
    "train.tensorboard=false",
    "train.epoch_curves=false",
]


def write_ks_release(raw: Path, clips: dict[str, tuple[int, str]], seconds: float = 0.3) -> Path:
    """A tiny Kinetics-Sounds release in its extracted layout (``clip -> (label, split)``): split
    lists, ``audio/<clip>.wav`` and two-frame ``frames/<clip>/`` folders; each clip's media
    differ."""
    import numpy as np
    from PIL import Image
    from scipy.io import wavfile

    sr = 8000
    lists: dict[str, list[str]] = {"train": [], "test": []}
    (raw / "audio").mkdir(parents=True, exist_ok=True)
    for k, (clip, (label, split)) in enumerate(clips.items()):
        t = np.arange(int(seconds * sr)) / sr
        wave = (0.3 * np.sin(2 * np.pi * (200 + 30 * k) * t) * 32767).astype(np.int16)
        wavfile.write(raw / "audio" / f"{clip}.wav", sr, wave)
        (raw / "frames" / clip).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            img = np.full((8, 8, 3), (40 * k + 90 * i) % 256, dtype=np.uint8)
            Image.fromarray(img, "RGB").save(raw / "frames" / clip / f"{i + 1:05d}.jpg")
        lists[split].append(f"{clip} {label}")
    (raw / "my_train.txt").write_text("\n".join(lists["train"]) + "\n")
    (raw / "my_test.txt").write_text("\n".join(lists["test"]) + "\n")
    return raw


#: Four training and two test clips of two classes.
KS_CLIPS: dict[str, tuple[int, str]] = {
    "a0": (0, "train"),
    "a1": (1, "train"),
    "a2": (0, "train"),
    "a3": (1, "train"),
    "b0": (0, "test"),
    "b1": (1, "test"),
}
#: ``mmbalance prepare kinetics_sounds`` options for :func:`write_ks_release` releases.
KS_PREPARE_ARGS: list[str] = ["--image-size", "16", "--fbank-frames", "16", "--no-progress"]


def cli_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command line in-process on ``argv``: it must exit 2 with one line on stderr
    (``mmbalance: error: ...``) and no traceback; returns that line."""
    from mmbalance.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith("mmbalance: error: "), err
    assert "Traceback" not in err
    return err


@contextlib.contextmanager
def no_hang(seconds: int = 30) -> Iterator[None]:
    """Fail instead of hanging: a blocking call is interrupted after ``seconds``."""

    def interrupt(signum: int, frame: Any) -> None:
        raise TimeoutError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
