"""Search for a *competition regime* of ``synthetic``: m2 informative but harder to learn.

For each dataset setting and method, trains ``--seeds`` runs and prints the fused test accuracy
and the linear-probe accuracies of both encoders (mean ± std over seeds). The signature of
modality competition is ``joint``'s m2 probe clearly below ``unimodal[m2]``'s (the m2 encoder
trained alone), with ``untrained`` (the encoder after a single step at a negligible learning
rate) well below both.

    PYTHONPATH=. python benchmarks/find_regime.py                   # the settings searched
    PYTHONPATH=. python benchmarks/find_regime.py --settings competition --methods all
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmbalance.builder import resolve_config
from mmbalance.errors import TrainingDiverged
from mmbalance.train import fit

# dataset settings searched (``default`` and ``competition`` are the presets)
SETTINGS: dict[str, dict[str, object]] = {
    "default": {},
    "competition": {"preset": "competition"},
    "sh0.6_s2_d4": {"shares": [0.6, 0.3, 0.1], "signal": [3.0, 2.0], "depth": [1, 4]},
    "sh0.8_s1.5_d6_l0.1": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 1.5],
        "depth": [1, 6],
        "leak": 0.1,
    },
    "sh0.8_s2_d4_l0.1": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 2.0],
        "depth": [1, 4],
        "leak": 0.1,
    },
    "sh0.9_s2_d6_l0.05": {
        "shares": [0.9, 0.1, 0.0],
        "signal": [3.0, 2.0],
        "depth": [1, 6],
        "leak": 0.05,
    },
    "sh0.8_s2_d6_l0.1": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 2.0],
        "depth": [1, 6],
        "leak": 0.1,
    },
    "sh0.8_s1.5_d6_l0.02": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 1.5],
        "depth": [1, 6],
        "leak": 0.02,
    },
    "sh0.8_s1.5_d8_l0.05": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 1.5],
        "depth": [1, 8],
        "leak": 0.05,
    },
    "sh0.8_s1.5_d8_l0.02": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 1.5],
        "depth": [1, 8],
        "leak": 0.02,
    },
    "sh0.8_s2_d6_l0.02": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 2.0],
        "depth": [1, 6],
        "leak": 0.02,
    },
    "sh0.8_s2_d8_l0.05": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 2.0],
        "depth": [1, 8],
        "leak": 0.05,
    },
    "sh0.8_s2_d8_l0.02": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 2.0],
        "depth": [1, 8],
        "leak": 0.02,
    },
    "sh0.8_s1_d6_l0.02": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 1.0],
        "depth": [1, 6],
        "leak": 0.02,
    },
    "sh0.8_s1.25_d8_l0.02": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [3.0, 1.25],
        "depth": [1, 8],
        "leak": 0.02,
    },
    "sh0.8_m1s4_s1.5_d6_l0.02": {
        "shares": [0.8, 0.15, 0.05],
        "signal": [4.0, 1.5],
        "depth": [1, 6],
        "leak": 0.02,
    },
    "sh0.9_s1.5_d6_l0.02": {
        "shares": [0.9, 0.1, 0.0],
        "signal": [3.0, 1.5],
        "depth": [1, 6],
        "leak": 0.02,
    },
}

# method name -> config overrides
METHODS: dict[str, dict[str, object]] = {
    "untrained": {"method": "joint", "train.epochs": 1, "train.lr": 1e-6},
    "joint": {"method": "joint"},
    "unimodal_m2": {"method": "unimodal", "method.modality": "m2"},
    "multiloss": {"method": "multiloss"},
    "ensemble": {"method": "ensemble"},
    "mcr": {"method": "mcr"},
    "mcr_lam1": {"method": "mcr", "method.lam": 1.0},
    "mcr_lam5": {"method": "mcr", "method.lam": 5.0},
    "ogm_ge": {"method": "ogm_ge"},
    "opm": {"method": "opm"},
    "mmpareto": {"method": "mmpareto"},
}
CORE = ["untrained", "joint", "unimodal_m2"]


def run(setting: str, method: str, seed: int, out: Path) -> dict[str, float]:
    overrides: dict[str, object] = {
        "dataset": "synthetic",
        "dataset.n_test": 2000,
        "dataset.n_bayes": 20000,
        "train.seed": seed,
        "train.progress": False,
        "train.tensorboard": False,
        **{f"dataset.{k}": v for k, v in SETTINGS[setting].items()},
        **METHODS[method],
    }
    start = time.perf_counter()
    try:
        result = fit(resolve_config(overrides), out / f"{setting}_{method}_{seed}")
    except TrainingDiverged:
        nan = float("nan")
        return {"acc": nan, "p1": nan, "p2": nan, "bayes": nan, "sec": time.perf_counter() - start}
    test = result.metrics["test"]
    return {
        "acc": test["accuracy"],
        "p1": test["probe_accuracy_m1"],
        "p2": test["probe_accuracy_m2"],
        "bayes": result.bayes_accuracy or float("nan"),
        "sec": time.perf_counter() - start,
    }


def fmt(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):  # a diverged run (loss became nan)
        return f"{sum(math.isnan(v) for v in values)}/{len(values)} nan"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f}±{std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(CORE), help="comma list or 'all'")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    header = f"{'setting':<22}{'method':<13}{'acc':>13}{'probe_m1':>13}{'probe_m2':>13}"
    print(header + f"{'bayes':>8}{'s/run':>7}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            for method in methods:
                rows = [run(setting, method, s, Path(tmp)) for s in range(args.seeds)]
                col = {k: [r[k] for r in rows] for k in rows[0]}
                print(
                    f"{setting:<22}{method:<13}{fmt(col['acc']):>13}{fmt(col['p1']):>13}"
                    f"{fmt(col['p2']):>13}{statistics.fmean(col['bayes']):>8.3f}"
                    f"{statistics.fmean(col['sec']):>7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
