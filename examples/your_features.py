"""Your features through ``mmbalance compare``: export per-modality features to an ``.npz``, then
compare three methods on it with the command line and with the Python API.

Your own features come from your own backbones; here they are exported from a built-in dataset
(AV-Digits: handwritten digits and espeak-ng speech of the digit), flattened to one vector per
modality, with the labels (``y``) and the class names (``y_names``). No ``split`` array: the
``features`` dataset makes a stratified train/validation/test split, the same for every method
and seed, and standardises each vector with training statistics.

Run: ``python examples/your_features.py --out runs/your_features`` (a few minutes on 2 CPU
cores); ``--tiny`` runs it on a small synthetic dataset in seconds.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

METHODS = "joint,ensemble,ogm_ge"


def export_features(path: Path, dataset: str = "av-digits", **options: Any) -> Path:
    """Write the inputs of a built-in dataset, one flat vector per modality, to ``path``."""
    from mmbalance.builder import build_dataset, resolve_config

    data = build_dataset(resolve_config({"dataset": dataset, **options}))
    splits = [data.splits[s] for s in ("train", "val", "test")]
    arrays = {
        m: np.concatenate([s.inputs[m].reshape(len(s), -1).numpy() for s in splits])
        for m in data.modalities
    }
    arrays["y"] = np.concatenate([s.targets.numpy() for s in splits])
    if data.class_names:
        arrays["y_names"] = np.array(data.class_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def mmbalance_command() -> list[str]:
    """The installed ``mmbalance`` command (or this Python running the package's CLI)."""
    found = shutil.which("mmbalance")
    return [found] if found else [sys.executable, "-m", "mmbalance.cli"]


def compare_on_the_command_line(
    features: Path, out: Path, seeds: int = 3, settings: tuple[str, ...] = ()
) -> Path:
    """``mmbalance compare --dataset features dataset.path=FEATURES --methods ...``."""
    argv = [
        *mmbalance_command(),
        "compare",
        "--dataset",
        "features",
        f"dataset.path={features}",
        "--methods",
        METHODS,
        "--seeds",
        str(seeds),
        "--out",
        str(out),
        *settings,
    ]
    print("$", shlex.join(["mmbalance", *argv[len(mmbalance_command()) :]]), flush=True)
    subprocess.run(argv, check=True)
    return out / "results.json"


def compare_in_python(
    features: Path, out: Path, seeds: int = 3, settings: tuple[str, ...] = ()
) -> Any:
    """The same comparison through :func:`mmbalance.api.compare`, on the arrays in memory."""
    from mmbalance.api import compare

    with np.load(features) as npz:
        arrays = {key: npz[key] for key in npz.files}
    result = compare(METHODS, arrays, out=out, seeds=seeds, overrides=list(settings))
    print(result.table)
    print(f"report: {result.report_html}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/your_features", help="output directory")
    parser.add_argument("--tiny", action="store_true", help="a small synthetic run (seconds)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.tiny:
        features = export_features(
            out / "features.npz",
            "synthetic",
            **{"dataset.n_train": 120, "dataset.n_val": 60, "dataset.n_test": 60},
        )
        seeds = 1
        settings: tuple[str, ...] = (
            "train.epochs=1",
            "train.progress=false",
            "train.tensorboard=false",
            "train.epoch_curves=false",
        )
    else:
        features = export_features(out / "features.npz")
        seeds, settings = 3, ("train.epochs=10",)
    compare_on_the_command_line(features, out / "command_line", seeds, settings)
    compare_in_python(features, out / "python", seeds, settings)


if __name__ == "__main__":
    main()
