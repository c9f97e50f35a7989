"""Per-epoch per-modality curves (``train.epoch_curves``) and the analysis of regression runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL

from mmbalance.builder import build_components, build_dataset, resolve_config
from mmbalance.cli import main
from mmbalance.config import load_yaml
from mmbalance.eval.contribution import shapley_contributions
from mmbalance.eval.probe import latents_of, split_half_probe_accuracy
from mmbalance.train import fit
from mmbalance.train.checkpoint import load_checkpoint

TINY = {**SMALL, "dataset.n_test": 400, "dataset.n_bayes": 1000, "train.epochs": 3}


def _rows(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _last_weights(run_dir: Path) -> tuple[Any, Any, Any]:
    """The model of a run directory with its ``last.ckpt`` weights, its method and its data."""
    cfg = resolve_config(load_yaml(run_dir / "config.yaml"))
    data = build_dataset(cfg)
    method, model, _ = build_components(cfg, data)
    state = load_checkpoint(run_dir / "last.ckpt")["module"]
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    )
    return model.eval(), method, data


@pytest.mark.parametrize(
    ("overrides", "modalities", "heads"),
    [
        ({"method": "joint"}, ["m1", "m2"], False),
        ({"method": "multiloss", "dataset.num_modalities": 3}, ["m1", "m2", "m3"], True),
    ],
)
def test_curves_in_metrics_csv_and_match_a_direct_computation(
    overrides: dict, modalities: list[str], heads: bool, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    fit(resolve_config({**TINY, **overrides}), run_dir)
    rows = _rows(run_dir)
    assert len(rows) == TINY["train.epochs"]
    expected = {f"val_{q}_{m}" for q in ("probe_acc", "shapley") for m in modalities}
    expected |= {f"val_head_acc_{m}" for m in modalities} if heads else set()
    curve_columns = {k for k in rows[0] if k.startswith(("val_head_", "val_probe_", "val_shap"))}
    assert curve_columns == expected
    for row in rows:
        for m in modalities:
            assert 0.0 <= row[f"val_probe_acc_{m}"] <= 1.0
            assert -1.0 <= row[f"val_shapley_{m}"] <= 1.0
            if heads:
                assert row[f"val_head_acc_{m}"] == pytest.approx(row[f"val_unimodal_accuracy_{m}"])
        # efficiency: the Shapley values add up to v(all) - v(none) <= the validation accuracy
        assert sum(row[f"val_shapley_{m}"] for m in modalities) <= row["val_accuracy"] + 1e-9
        assert 0.0 <= row["val_imbalance_degree"] <= 1.0
    # m1 is the strong modality of the synthetic benchmark (5 classes, chance 0.2)
    assert rows[-1]["val_probe_acc_m1"] > 0.5 and rows[-1]["val_shapley_m1"] > 0.2

    # the last row was computed from the weights saved in last.ckpt: recompute it directly
    model, method, data = _last_weights(run_dir)
    z, y = latents_of(model, data.splits["val"])
    direct = shapley_contributions(model.heads, z, y, "permute", method.predict)
    for m in modalities:
        assert rows[-1][f"val_shapley_{m}"] == pytest.approx(direct["shapley"][m], abs=1e-9)
        probe = split_half_probe_accuracy(z[m], y, "classification", data.num_outputs)
        assert rows[-1][f"val_probe_acc_{m}"] == pytest.approx(probe, abs=1e-9)
    assert direct["coalitions"]["+".join(modalities)] == pytest.approx(rows[-1]["val_accuracy"])


def test_epoch_curves_switch_turns_the_curves_off(tmp_path: Path) -> None:
    result = fit(resolve_config({**TINY, "train.epochs": 1, "train.epoch_curves": False}), tmp_path)
    assert not [k for k in result.history[0] if "shapley" in k or "probe" in k]
    assert "val_accuracy" in _rows(tmp_path)[0]


def test_a_model_that_ignores_a_modality_gets_zero_contribution(tmp_path: Path) -> None:
    # ``unimodal`` predicts from the m1 head alone: m2 cannot change any prediction
    fit(resolve_config({**TINY, "method": "unimodal", "method.modality": "m1"}), tmp_path)
    rows = _rows(tmp_path)
    assert all(r["val_shapley_m2"] == 0.0 for r in rows)
    assert all(r["val_shapley_m1"] > 0.3 for r in rows)
    assert all(r["val_imbalance_degree"] == 1.0 for r in rows)


def test_regression_analysis_and_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "reg"
    result = fit(resolve_config({**TINY, "dataset.task": "regression"}), run_dir)
    test = result.metrics["test"]
    analysis = json.loads((run_dir / "analysis.json").read_text())
    numbers = [
        *analysis["probe_accuracy"].values(),
        *analysis["contribution"]["shapley"].values(),
        *analysis["contribution_neg_mae"]["shapley"].values(),
        analysis["contribution"]["imbalance_degree"],
    ]
    assert all(math.isfinite(v) for v in numbers)
    assert analysis["contribution"]["score"] == "accuracy"
    # the fused coalition scores are the run's own binary accuracy and (minus) MAE
    assert analysis["contribution"]["coalitions"]["m1+m2"] == pytest.approx(test["binary_accuracy"])
    assert analysis["contribution_neg_mae"]["coalitions"]["m1+m2"] == pytest.approx(-test["mae"])
    # the m1 encoder learned the (sign of the) target: its probe is far above chance
    assert analysis["probe_accuracy"]["m1"] > 0.75
    errors = analysis["errors"]
    # targets are the centred class index: the zero ones are not scored (Acc-2 convention), the
    # groups partition the others
    assert errors["n"] + errors["not_scored"] == TINY["dataset.n_test"]
    assert 0 < errors["not_scored"] < TINY["dataset.n_test"] / 2
    assert sum(g["count"] for g in errors["groups"].values()) == errors["n"]
    assert errors["fused_accuracy"] == pytest.approx(test["binary_accuracy"])
    for row in _rows(run_dir):
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("val_"))
        assert {"val_probe_acc_m1", "val_shapley_m2"} <= set(row)

    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "Per-modality curves over epochs" in page and "sign of the prediction" in page
    assert page.count('src="data:image/png;base64,') == 5
