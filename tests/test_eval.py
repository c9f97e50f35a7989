"""End-of-run analysis: Shapley contributions, error analysis, and the report of a real compare
(the report package on its own, and in a browser: ``test_report.py``)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import FAST_ARGS as FAST
from torch import nn

from mmbalance.cli import main
from mmbalance.eval.contribution import (
    coalition_values,
    imbalance_degree,
    shapley_contributions,
    shapley_from_values,
)
from mmbalance.eval.error_analysis import error_analysis
from mmbalance.models.output import ModelOutput


def _tiny(modalities: list[str], uses: list[str], seed: int = 0):
    """Latents, targets and a small non-linear head that reads only the ``uses`` modalities."""
    g = torch.Generator().manual_seed(seed)
    n, d, k = 300, 3, 4
    latents = {m: torch.randn(n, d, generator=g) for m in modalities}
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d * len(uses), 16), nn.Tanh(), nn.Linear(16, k))
    with torch.no_grad():
        full = net(torch.cat([latents[m] for m in uses], -1))
        # mostly the head's own answer, so that every coalition has a different accuracy
        targets = torch.where(
            torch.rand(n, generator=g) < 0.8, full.argmax(-1), torch.randint(k, (n,), generator=g)
        )

    def heads(z):
        return ModelOutput(net(torch.cat([z[m] for m in uses], -1)), dict(z))

    return heads, latents, targets


def _brute_force_shapley(values, modalities):
    """Average marginal contribution over every order in which modalities join."""
    orders = list(itertools.permutations(modalities))
    phi = dict.fromkeys(modalities, 0.0)
    for order in orders:
        present: frozenset[str] = frozenset()
        for m in order:
            phi[m] += values[present | {m}] - values[present]
            present = present | {m}
    return {m: v / len(orders) for m, v in phi.items()}


@pytest.mark.parametrize("removal", ["permute", "zero"])
def test_shapley_is_efficient_and_matches_brute_force(removal: str) -> None:
    mods = ["a", "b", "c"]
    heads, latents, targets = _tiny(mods, mods)
    values = coalition_values(heads, latents, targets, removal)
    assert len(values) == 2**3
    phi = shapley_from_values(values, mods)
    assert math.isclose(
        sum(phi.values()), values[frozenset(mods)] - values[frozenset()], abs_tol=1e-12
    )
    brute = _brute_force_shapley(values, mods)
    for m in mods:
        assert math.isclose(phi[m], brute[m], abs_tol=1e-12)
    assert any(abs(v) > 0.01 for v in phi.values())


@pytest.mark.parametrize("removal", ["permute", "zero"])
def test_ignored_modality_gets_zero(removal: str) -> None:
    heads, latents, targets = _tiny(["a", "b"], ["a"])
    result = shapley_contributions(heads, latents, targets, removal)
    assert result["shapley"]["b"] == 0.0
    assert result["shapley"]["a"] > 0.3
    assert result["imbalance_degree"] == 1.0


def test_permutation_is_deterministic() -> None:
    heads, latents, targets = _tiny(["a", "b"], ["a", "b"])
    first = shapley_contributions(heads, latents, targets)
    assert shapley_contributions(heads, latents, targets) == first


def test_imbalance_degree() -> None:
    assert imbalance_degree({"a": 0.2, "b": 0.2}) == 0.0
    assert imbalance_degree({"a": 0.3, "b": 0.1}) == pytest.approx(0.5)
    assert imbalance_degree({"a": -0.1, "b": 0.0}) == 0.0


def test_error_analysis_hand_made_case() -> None:
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    fused = torch.tensor([0, 1, 2, 1, 1, 0, 0, 0])
    uni = {
        "a": torch.tensor([0, 1, 0, 0, 0, 0, 1, 1]),  # right on 0, 1, 3, 7
        "b": torch.tensor([0, 0, 2, 1, 0, 0, 1, 0]),  # right on 0, 2
    }
    out = error_analysis(fused, uni, targets)
    g = out["groups"]
    assert list(g) == ["none", "a", "b", "a+b"]
    assert sum(v["count"] for v in g.values()) == len(targets)  # a partition
    assert (g["a+b"]["count"], g["a+b"]["fused_correct"]) == (1, 1)  # sample 0
    assert (g["a"]["count"], g["a"]["fused_correct"]) == (3, 1)  # samples 1, 3, 7
    assert (g["b"]["count"], g["b"]["fused_correct"]) == (1, 1)  # sample 2
    assert (g["none"]["count"], g["none"]["fused_correct"]) == (3, 2)  # samples 4, 5, 6
    assert out["routing_rate"] == pytest.approx(3 / 5)
    assert out["synergy_rate"] == pytest.approx(2 / 3)
    assert out["fused_accuracy"] == pytest.approx(5 / 8)


def test_error_analysis_groups_partition_three_modalities() -> None:
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(3, (200,), generator=g)
    uni = {m: torch.randint(3, (200,), generator=g) for m in ("x", "y", "z")}
    out = error_analysis(torch.randint(3, (200,), generator=g), uni, targets)
    assert len(out["groups"]) == 8
    assert sum(v["count"] for v in out["groups"].values()) == 200
    assert sum(v["fused_correct"] for v in out["groups"].values()) == round(
        200 * out["fused_accuracy"]
    )


def test_compare_writes_analysis_and_report(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    code = main(
        ["compare", "--methods", "joint,multiloss", "--seeds", "2", "--out", str(out), *FAST]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # the final table, as a batch log sees it: 80 columns, every number whole
    table = printed.out.split("results:")[0]
    assert max(len(line) for line in table.splitlines()) <= 80
    assert "…" not in table and "(reference)" in table and "multiloss" in table
    for method in ("joint", "multiloss"):
        run = out / method / "seed0"
        analysis = json.loads((run / "analysis.json").read_text())
        assert set(analysis["contribution"]["shapley"]) == {"m1", "m2"}
        test = json.loads((run / "metrics.json").read_text())["metrics"]["test"]
        for key in ("shapley_m1", "shapley_m2", "routing_rate", "imbalance_degree"):
            assert key in test
        coal = analysis["contribution"]["coalitions"]
        total = sum(analysis["contribution"]["shapley"].values())
        assert total == pytest.approx(coal["m1+m2"] - coal["none"])
        assert coal["m1+m2"] == pytest.approx(test["accuracy"])
    assert (
        json.loads((out / "joint/seed0/analysis.json").read_text())["errors"]["unimodal_predictors"]
        == "linear_probes"
    )
    assert (
        json.loads((out / "multiloss/seed0/analysis.json").read_text())["errors"][
            "unimodal_predictors"
        ]
        == "unimodal_heads"
    )
    records = json.loads((out / "results.json").read_text())
    assert any(r["metric"] == "shapley_m2" for r in records)

    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for method in ("joint", "multiloss"):
        assert method in page and method in md
    assert page.count("<img alt=") == page.count('src="data:image/png;base64,') == 5
    assert "Bayes accuracy" in page and "synthetic" in page  # config embedded
    assert "significant" in md
    # joint (no heads) and multiloss (heads): the error analysis says they used different
    # unimodal predictors, next to a table that names each method's kind
    errors_md = md.split("## Error analysis")[1].split("\n## ")[0]
    assert "Warning: the methods used different unimodal predictors" in errors_md
    assert "| joint | linear probes |" in errors_md
    assert "| multiloss | unimodal heads |" in errors_md
    assert "<strong>Warning: the methods used different unimodal predictors" in page
    assert "report_modality_curves.png" in md

    # a single run directory makes a report too, without the warning
    assert main(["report", str(out / "joint" / "seed1")]) == 0
    single = (out / "joint" / "seed1" / "report.html").read_text()
    assert single.count('src="data:image/png;base64,') == 5
    assert "Warning" not in single and "used linear probes as unimodal predictors" in single
    assert main(["report", str(tmp_path)]) == 2
