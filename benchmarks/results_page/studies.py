"""What the accuracy benchmark measures: the studies (dataset settings), the method order of the
tables and the hyperparameter search space of every method.

The search (same budget for every method): three candidate values of the method's main
hyperparameter (``SEARCH``; for methods without one, the learning rate at 0.5x, 1x and 2x the
dataset's default), each trained once (seed 0) on the study's search point, and the candidate
with the highest validation accuracy (ties: the middle value) is kept for every point and seed
of the study. The test split is never looked at before the choice is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# method -> (option, candidates); ``train.lr`` candidates multiply the dataset's default rate
SEARCH: dict[str, tuple[str, tuple[float, ...]]] = {
    "joint": ("train.lr", (0.5, 1.0, 2.0)),
    "unimodal": ("train.lr", (0.5, 1.0, 2.0)),
    "ensemble": ("train.lr", (0.5, 1.0, 2.0)),
    "unipre_frozen": ("train.lr", (0.5, 1.0, 2.0)),
    "unipre_finetuned": ("train.lr", (0.5, 1.0, 2.0)),
    "multiloss": ("method.lam_uni", (0.3, 1.0, 3.0)),
    "mcr": ("method.lam", (0.01, 0.1, 1.0)),
    "ogm": ("method.alpha", (0.1, 0.4, 0.8)),
    "ogm_ge": ("method.alpha", (0.1, 0.4, 0.8)),
    "opm": ("method.q_base", (0.3, 0.5, 0.7)),
    "mmpareto": ("method.gamma", (1.0, 1.5, 2.0)),
}
DEFAULT_SEARCH = ("train.lr", (0.5, 1.0, 2.0))
# the order of the tables: references first, then the balancing methods
ORDER = [
    "joint",
    "unimodal",
    "ensemble",
    "multiloss",
    "unipre_frozen",
    "unipre_finetuned",
    "mcr",
    "ogm",
    "ogm_ge",
    "opm",
    "mmpareto",
]
WEAK_SHARE = 0.05  # the weak modality's unique share, fixed along the sweep
SWEEP = (0.05, 0.15, 0.40)  # the strong modality's unique share


@dataclass(frozen=True)
class Point:
    """One dataset setting of a study (``x``: its position on the study's sweep axis)."""

    name: str
    overrides: Mapping[str, Any]
    x: float | None = None


@dataclass(frozen=True)
class Study:
    """A family of dataset settings searched once (at ``points[search]``) and run on 5 seeds."""

    name: str
    title: str
    description: str
    points: tuple[Point, ...]
    search: int = 0
    x_label: str = ""


def _sweep_point(share: float) -> Point:
    shares = [round(1 - share - WEAK_SHARE, 4), share, WEAK_SHARE]
    return Point(
        f"u1={share:.2f}",
        {"dataset": "synthetic", "dataset.preset": "competition", "dataset.shares": shares},
        share,
    )


STUDIES: tuple[Study, ...] = (
    Study(
        "synthetic",
        "Synthetic, 2 modalities: imbalance sweep",
        "The `competition` preset (modality 1: signal 3, depth 1; modality 2: signal 1, a depth-6 "
        "lift with leak 0.02; 1000 training samples, MLP encoders, SGD, 40 epochs). The share "
        "of samples whose label is only in the strong modality 1 grows along the sweep while "
        f"the weak modality's unique share stays at {WEAK_SHARE}; the rest is shared.",
        tuple(_sweep_point(s) for s in SWEEP),
        search=1,
        x_label="share of samples whose label is only in modality 1",
    ),
    Study(
        "synthetic3",
        "Synthetic, 3 modalities",
        "Three modalities: modality 1 easy (signal 3, depth 1), modalities 2 and 3 hard (signal "
        "1, depth-6 lifts, leak 0.02); shares: 70 % shared, 15 % unique to modality 1, 7.5 % "
        "unique to each of the others.",
        (
            Point(
                "default",
                {
                    "dataset": "synthetic",
                    "dataset.num_modalities": 3,
                    "dataset.shares": [0.7, 0.15, 0.075, 0.075],
                    "dataset.signal": [3.0, 1.0, 1.0],
                    "dataset.depth": [1, 6, 6],
                    "dataset.leak": 0.02,
                },
            ),
        ),
    ),
    Study(
        "av-digits",
        "AV-Digits",
        "Real 8x8 handwritten digits paired with espeak-ng speech of the same digit (log-mel); "
        "the dataset's default model and schedule.",
        (Point("default", {"dataset": "av-digits"}),),
    ),
    Study(
        "av-fashion",
        "AV-Fashion",
        "Fashion-MNIST paired with spoken class names at -18 dB SNR (5000 training samples); the "
        "dataset's default model and schedule.",
        (Point("default", {"dataset": "av-fashion"}),),
    ),
)
