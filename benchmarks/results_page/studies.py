"""What the accuracy benchmark measures: the studies (dataset settings), the method order of the
tables and the hyperparameter search space of every method.

The search (same budget for every method): three candidate values of the method's main
hyperparameter (``Method.searched_option``: its ``search_space``, or the learning rate at 0.5x,
1x and 2x the dataset's default), each trained once (seed 0) on the study's search point, and
the candidate that ``mmbalance compare --search``'s rule chooses (the highest validation
accuracy, then the lower validation loss; exact ties: the middle value) is kept for every point
and seed of the study. The test split is never looked at before the choice is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
    "mlb",
    "agm",
    "mslr",
    "mmcosine",
    "pmr",
    "reconboost",
    "dr",
    "gblending",
]
#: the methods that act by scaling whole gradients, learning rates or losses per modality, and
#: the references they are compared with, for the optimizer axis (SGD against Adam)
GRADIENT_MODULATION = (
    "joint",
    "unimodal",
    "ensemble",
    "ogm",
    "ogm_ge",
    "mlb",
    "mslr",
    "agm",
    "pmr",
)
#: the 2025 methods (the named method set ``recent`` of ``mmbalance.compare``), which the SGD arm
#: runs too: their official codes train with SGD (Data Remixing's with Adam)
RECENT = ("aug", "dgl", "g2d", "remix", "midas")
#: the methods of the SGD arm
SGD_ARM = (*GRADIENT_MODULATION, *RECENT)
#: the SGD arm of the optimizer axis: the regime search's SGD candidate ``fa_r8_sgd_lr0.01``
#: (``benchmarks/results/av_regime_search.md``), which met every regime criterion; chosen there,
#: before any balancing method was run
AV_FASHION_CNN_SGD = {
    "dataset": "av-fashion-cnn",
    "train.optimizer": "sgd",
    "train.lr": 0.01,
    "train.momentum": 0.9,
    "train.epochs": 10,
}
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
    #: the methods the study runs (``None``: every registered method)
    methods: tuple[str, ...] | None = None
    #: a method run as a variant here (``NAME[KEY=V]``), fixed with the study, before any run
    variants: Mapping[str, str] = field(default_factory=dict)


def _sweep_point(share: float) -> Point:
    shares = [round(1 - share - WEAK_SHARE, 4), share, WEAK_SHARE]
    return Point(
        f"u1={share:.2f}",
        {"dataset": "synthetic", "dataset.preset": "competition", "dataset.shares": shares},
        share,
    )


STUDIES: tuple[Study, ...] = (
    Study(
        "av-fashion-cnn",
        "AV-Fashion-CNN: the competition regime (Adam)",
        "Fashion-MNIST images paired with spoken class names at -12 dB SNR, ResNet-18 encoders of "
        "width 8 on the spectrogram and the image, Adam 2e-3, batch 128, 6 epochs: the setting "
        "`benchmarks/find_av_regime.py` chose by criteria fixed before any balancing method ran "
        "(joint below the ensemble by 6 points, the speech under-optimised inside joint).",
        (Point("default", {"dataset": "av-fashion-cnn"}),),
        # OPM's journal warm-up is 6 of 100 epochs; on this 6-epoch schedule its default (6)
        # would leave it never acting (refused), so it keeps the first epoch only
        variants={"opm": "opm[warmup_epochs=1]"},
    ),
    Study(
        "av-fashion-cnn-sgd",
        "AV-Fashion-CNN under SGD: the optimizer axis",
        "The same data and encoders trained with SGD (0.01, momentum 0.9, 10 epochs: the regime "
        "search's SGD setting, which met every criterion), for the methods that scale gradients, "
        "learning rates or per-modality losses, which Adam's normalisation can undo, and the 2025 "
        "methods (`recent`).",
        (Point("default", AV_FASHION_CNN_SGD),),
        methods=SGD_ARM,
    ),
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
