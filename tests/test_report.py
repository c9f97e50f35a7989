"""The report package: statistics against scipy and hand formulas, the table writer, the figures'
panels, damaged input, the import layers, and the page in headless Chromium at 1280 px.

Most tests use a hand-made compare directory (:func:`fake_compare`), so they take no training.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from scipy import stats as sps

from mmbalance.cli import main
from mmbalance.errors import DataError
from mmbalance.report import (
    Column,
    Table,
    comparison_table,
    contribution_table,
    describe,
    error_table,
    holm,
    load_result_set,
    options_table,
    paired_tests,
    run_records,
    to_html,
    to_markdown,
    to_text,
    write_report,
)
from mmbalance.report.plots import comparison_panels, modality_curves

PACKAGE = Path(__file__).resolve().parents[1] / "mmbalance" / "report"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _records(values: dict[str, list[float]], metric: str = "accuracy") -> list[dict[str, Any]]:
    return [
        {"method": m, "seed": s, "split": "test", "metric": metric, "value": v}
        for m, vs in values.items()
        for s, v in enumerate(vs)
    ]


# --- statistics ----------------------------------------------------------------------------------
def test_describe_is_the_t_interval_of_scipy() -> None:
    values = [0.81, 0.84, 0.79, 0.86, 0.83]
    stat = describe(values)
    assert stat is not None and stat.n == 5
    low, high = sps.t.interval(0.95, 4, loc=sum(values) / 5, scale=sps.sem(values))
    assert stat.low == pytest.approx(low, abs=1e-12)
    assert stat.high == pytest.approx(high, abs=1e-12)
    # three seeds: t_{0.975,2} = 4.303, more than twice the normal 1.96
    three = describe([0.1, 0.2, 0.4])
    sd = math.sqrt(((0.1 - 7 / 30) ** 2 + (0.2 - 7 / 30) ** 2 + (0.4 - 7 / 30) ** 2) / 2)
    assert three.half_width == pytest.approx(4.302652729911275 * sd / math.sqrt(3), rel=1e-9)
    single = describe([0.5, None, float("nan")])
    assert single.n == 1 and math.isnan(single.half_width)
    assert describe([]) is None


def _holm_by_hand(p: dict[str, float]) -> dict[str, float]:
    """Holm's step-down, written from its definition: the i-th smallest p-value (1-based) times
    (k - i + 1), then the running maximum over the smaller ones, capped at 1."""
    ranked = sorted(p, key=p.get)
    k = len(ranked)
    out = {}
    for i, key in enumerate(ranked, start=1):
        candidates = [min(1.0, (k - j + 1) * p[ranked[j - 1]]) for j in range(1, i + 1)]
        out[key] = max(candidates)
    return out


def test_holm_matches_its_definition() -> None:
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06}
    )
    rng = random.Random(3)
    for _ in range(20):
        p = {f"m{i}": rng.random() ** 3 for i in range(rng.randint(1, 9))}
        assert holm(p) == pytest.approx(_holm_by_hand(p))
    out = holm({"a": 0.2, "b": float("nan")})  # no test: left out of the family
    assert out["a"] == pytest.approx(0.2) and math.isnan(out["b"])


def test_paired_tests_match_scipy_ttest_rel_with_holm() -> None:
    rng = random.Random(0)
    joint = [0.86 + rng.gauss(0, 0.01) for _ in range(5)]
    values = {"joint": joint}
    for i, shift in enumerate((0.0, 0.004, 0.02, -0.03)):
        values[f"m{i}"] = [j + shift + rng.gauss(0, 0.006) for j in joint]
    tests = paired_tests(_records(values))
    assert set(tests) == {"m0", "m1", "m2", "m3"}
    raw = {m: sps.ttest_rel(values[m], joint).pvalue for m in tests}
    expected = _holm_by_hand(raw)
    for m, t in tests.items():
        diffs = [a - b for a, b in zip(values[m], joint, strict=True)]
        assert t.n == 5 and t.reference == "joint"
        assert t.mean_diff == pytest.approx(sum(diffs) / 5)
        half = sps.t.ppf(0.975, 4) * sps.tstd(diffs) / math.sqrt(5)
        assert t.half_width == pytest.approx(half)
        assert t.p == pytest.approx(raw[m])
        assert t.p_holm == pytest.approx(expected[m])
        assert t.significant == (expected[m] < 0.05)
    assert tests["m3"].significant and not tests["m0"].significant


def test_the_old_two_standard_errors_rule_no_longer_calls_noise_significant() -> None:
    # three seeds whose differences pass |mean| > 2 sd / sqrt(n) (the old rule), while the
    # paired t-test gives p = 0.10 (t = 2.89 with 2 degrees of freedom)
    joint = [0.80, 0.82, 0.81]
    diffs = [0.010, 0.004, 0.016]
    mean, sd = sum(diffs) / 3, sps.tstd(diffs)
    assert abs(mean) > 2 * sd / math.sqrt(3)
    values = {"joint": joint, "a": [j + d for j, d in zip(joint, diffs, strict=True)]}
    values["b"] = [j + d for j, d in zip(joint, [0.011, 0.003, 0.017], strict=True)]
    tests = paired_tests(_records(values))
    for m in ("a", "b"):
        p = sps.ttest_rel(values[m], joint).pvalue
        assert 0.05 < p < 0.2
        assert tests[m].p == pytest.approx(p)
        assert not tests[m].significant
    # the reference absent, or a single shared seed: no test
    assert paired_tests(_records({"a": [0.8]})) == {}
    one = paired_tests(_records({"joint": [0.8], "a": [0.9]}))["a"]
    assert one.n == 1 and math.isnan(one.p) and not one.significant


def _simulated_power(ratio: float, n: int, family: int, trials: int = 6000) -> float:
    """Share of simulated designs (n seeds of paired differences N(ratio, 1)) whose two-sided
    t-test has p < 0.05 / family: Holm's first step, from its definition."""
    import numpy as np

    rng = np.random.default_rng(n)
    diffs = rng.normal(ratio, 1.0, size=(trials, n))
    p = sps.ttest_1samp(diffs, 0.0, axis=1).pvalue
    return float((p < 0.05 / family).mean())


def test_seeds_for_significance_is_the_fewest_with_an_80_percent_chance() -> None:
    from mmbalance.report.stats import required_ratio, seeds_for_significance

    # the ratio of mean to paired sd that 3 seeds and 8 methods need, from the t quantile
    assert required_ratio(3, 8) == pytest.approx(sps.t.ppf(1 - 0.05 / 16, 2) / math.sqrt(3))
    assert math.isnan(required_ratio(1, 8))
    for mean, sd, family in ((0.049, 0.02, 8), (0.019, 0.0108, 27), (0.03, 0.01, 1)):
        n = seeds_for_significance(mean, sd, family)
        assert n is not None and n >= 2
        assert _simulated_power(mean / sd, n, family) > 0.8 - 0.025  # 6000 trials: SE 0.005
        if n > 2:
            assert _simulated_power(mean / sd, n - 1, family) < 0.8 + 0.025
    assert seeds_for_significance(0.001, 0.05, 8) is None  # beyond 100 seeds
    assert seeds_for_significance(0.0, 0.01, 8) is None
    assert seeds_for_significance(0.02, 0.0, 8) == 2  # no spread at all


def test_the_table_says_plainly_when_the_seeds_cannot_decide() -> None:
    from mmbalance.report.stats import seeds_for_significance

    # the main job's situation: three seeds, eight methods, joint's spread swamps +5 points
    joint = [0.86, 0.90, 0.83]
    noise = [(0.015, -0.02, 0.005), (-0.01, 0.02, -0.01), (0.0, -0.015, 0.015)]
    values = {"joint": joint}
    for i in range(8):
        values[f"m{i}"] = [j + 0.01 * i + e for j, e in zip(joint, noise[i % 3], strict=True)]
    records = _records(values)
    tests = paired_tests(records)
    assert not any(t.significant for t in tests.values())
    notes = " ".join(comparison_table(records).notes)
    assert "No difference from `joint` is significant after Holm's correction over 8 methods" in (
        notes
    )
    ratio = sps.t.ppf(1 - 0.05 / 16, 2) / math.sqrt(3)
    assert f"With 3 seeds, a difference must be at least {ratio:.1f} times" in notes
    assert "none of the observed differences can be" in notes
    diffs = [a - b for a, b in zip(values["m7"], joint, strict=True)]
    seeds = seeds_for_significance(statistics.fmean(diffs), statistics.stdev(diffs), 8)
    assert f"`m7` vs `joint`: {100 * statistics.fmean(diffs):+.1f} points, about {seeds} seeds" in (
        notes
    )
    text = to_text(comparison_table(records), width=80)
    assert max(len(line) for line in text.splitlines()) <= 80 and "about" in text
    # a significant difference: no "no difference" sentence, no estimate for it
    values["big"] = [j + 0.2 + d for j, d in zip(joint, (0.001, -0.001, 0.0), strict=True)]
    notes = " ".join(comparison_table(_records(values)).notes)
    assert "No difference" not in notes and "`big`" not in notes
    one = comparison_table(_records({"joint": [0.8], "a": [0.9]})).notes
    assert any("needs at least 2 seeds" in n for n in one)


# --- records -------------------------------------------------------------------------------------
def test_run_records_from_a_summary_and_a_diverged_run() -> None:
    summary = {"metrics": {"val": {"accuracy": 0.8}, "test": {"accuracy": 0.7}}}
    summary["bayes_accuracy"] = 0.9
    rows = run_records("joint", 2, summary)
    assert {(r["split"], r["metric"], r["value"]) for r in rows} == {
        ("val", "accuracy", 0.8),
        ("test", "accuracy", 0.7),
        ("test", "bayes_accuracy", 0.9),
    }
    assert all(r["method"] == "joint" and r["seed"] == 2 for r in rows)
    diverged = run_records("ogm", 1, {"diverged": "loss is nan"})
    assert diverged == [
        {"method": "ogm", "seed": 1, "split": "test", "metric": "diverged", "value": 1.0}
    ]
    table = comparison_table(_records({"joint": [0.8, 0.82], "ogm": [0.81]}) + diverged)
    header = [c.title for c in table.columns]
    row = dict(zip(header, table.rows[1], strict=True))
    assert row["diverged"] == "1/2" and row["seeds"] == "1"


# --- a hand-made compare directory ---------------------------------------------------------------
def fake_compare(
    root: Path,
    methods: dict[str, dict[str, Any]],
    seeds: int = 3,
    modalities: tuple[str, ...] = ("audio", "video"),
    epochs: int = 4,
) -> Path:
    """A compare directory as ``mmbalance compare`` writes it, with made-up numbers.

    ``methods`` maps a label to ``{"acc": mean test accuracy, "uses": modalities it uses,
    "method": {config method section}}``."""
    rng = random.Random(1)
    records = []
    for label, spec in methods.items():
        uses = spec.get("uses", modalities)
        for seed in range(seeds):
            run = root / label / f"seed{seed}"
            run.mkdir(parents=True)
            acc = spec["acc"] + rng.gauss(0, 0.01)
            shapley = {
                m: (0.6 / len(uses) + rng.gauss(0, 0.02)) if m in uses else 0.0 for m in modalities
            }
            none = rng.randint(3, 9)
            groups = {
                "none": {
                    "count": none,
                    "fraction": none / 1000,
                    "fused_correct": 1,
                    "fused_accuracy": 1 / none,
                },
                "+".join(modalities): {
                    "count": 1000 - none,
                    "fraction": 1 - none / 1000,
                    "fused_correct": 900,
                    "fused_accuracy": 900 / (1000 - none),
                },
            }
            errors = {
                "n": 1000,
                "groups": groups,
                "routing_rate": 900 / (1000 - none),
                "synergy_rate": 1 / none,
                "fused_accuracy": acc,
                "unimodal_predictors": "unimodal_heads",
                "right_means": "class of the prediction equals the target",
            }
            test = {"accuracy": acc, "macro_f1": acc - 0.01}
            test |= {f"probe_accuracy_{m}": 0.5 + rng.random() / 10 for m in modalities}
            test |= {f"shapley_{m}": v for m, v in shapley.items()}
            test |= {"imbalance_degree": 0.5, "routing_rate": errors["routing_rate"]}
            test["synergy_rate"] = errors["synergy_rate"]
            test |= {"balanced_accuracy": acc - 0.005, "ece": 0.05 + rng.random() / 50}
            test |= {f"unimodal_ece_{m}": 0.1 for m in modalities}
            for pct in (20, 50, 100):
                for m in modalities:
                    lost = pct / 100 * (0.4 if m in uses else 0.0)
                    test[f"missing_{m}_{pct}"] = acc - lost + rng.gauss(0, 0.01)
                    test[f"noisy_{m}_{pct}"] = acc - lost * 1.1 + rng.gauss(0, 0.01)
                test[f"robust_{pct}"] = min(test[f"missing_{m}_{pct}"] for m in modalities)
            summary = {
                "metrics": {"val": {"accuracy": acc - 0.02}, "test": test},
                "best_epoch": epochs - 1,
                "epochs_run": epochs,
                "bayes_accuracy": 0.97,
            }
            (run / "metrics.json").write_text(json.dumps(summary))
            (run / "analysis.json").write_text(json.dumps({"errors": errors}))
            config = {
                "dataset": {"name": "synthetic"},
                "method": {"name": spec.get("name", label), **spec.get("method", {})},
                "train": {"epochs": epochs, "seed": seed},
            }
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            columns = ["epoch", "val_accuracy", "seconds"]
            columns += [
                f"val_{q}_{m}" for q in ("head_acc", "probe_acc", "shapley") for m in modalities
            ]
            lines = [",".join(columns)]
            for e in range(epochs):
                row = [e, acc - 0.1 / (e + 1), 0.5 + rng.random() / 10]
                for q in ("head_acc", "probe_acc", "shapley"):
                    for m in modalities:
                        row.append(0.3 + 0.1 * e if m in uses else (0.0 if q == "shapley" else 0.2))
                lines.append(",".join(str(v) for v in row))
            (run / "metrics.csv").write_text("\n".join(lines) + "\n")
            records += run_records(label, seed, summary)
    (root / "results.json").write_text(json.dumps(records))
    return root


#: Eight methods with long labels (method variants) and two single-modality baselines.
WIDE = {
    "joint": {"acc": 0.86},
    "unimodal[audio]": {
        "acc": 0.40,
        "uses": ("audio",),
        "name": "unimodal",
        "method": {"modality": "audio"},
    },
    "unimodal[video]": {
        "acc": 0.83,
        "uses": ("video",),
        "name": "unimodal",
        "method": {"modality": "video"},
    },
    "ensemble": {"acc": 0.87},
    "ogm_ge[alpha=1.2]": {"acc": 0.875, "name": "ogm_ge", "method": {"alpha": 1.2}},
    "mcr[strategy=independent]": {
        "acc": 0.88,
        "name": "mcr",
        "method": {"strategy": "independent"},
    },
    "mmpareto": {"acc": 0.872},
    "opm": {"acc": 0.85},
}


def test_single_modality_methods_are_left_out_where_their_numbers_mean_nothing(tmp_path) -> None:
    results = load_result_set(fake_compare(tmp_path / "cmp", WIDE))
    records = results.records
    panels = dict(comparison_panels(records))
    assert panels["partial"] == ["unimodal[audio]", "unimodal[video]"]
    assert "joint" not in panels["delta"] and "mcr[strategy=independent]" in panels["delta"]
    assert "unimodal[video]" not in panels["probe:audio"]
    assert "unimodal[video]" in panels["probe:video"]
    curves = modality_curves(results.histories(), {"unimodal[audio]": {"video"}})
    assert "unimodal[audio]" not in curves[("shapley", "video")]
    assert "unimodal[audio]" in curves[("shapley", "audio")]
    table = contribution_table(records)
    header = [c.title for c in table.columns]
    row = dict(zip(header, table.rows[1], strict=True))
    assert row["method"] == "unimodal[audio]"
    assert row["Shapley video"] == "—" and row["probe video"] == "—"
    assert row["Shapley audio"] != "—"


def test_tables_show_intervals_p_values_counts_options_and_cost(tmp_path) -> None:
    results = load_result_set(fake_compare(tmp_path / "cmp", WIDE))
    from mmbalance.report import epoch_seconds

    seconds = epoch_seconds(results.histories())
    table = comparison_table(results.records, epoch_seconds=seconds)
    header = [c.title for c in table.columns]
    assert header[:6] == [
        "method",
        "seeds",
        "test accuracy",
        "Δ accuracy vs joint",
        "p (Holm)",
        "significant",
    ]
    assert not any("_" in h for h in header)  # no raw metric keys
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in table.rows}
    acc = [
        r["value"]
        for r in results.records
        if r["method"] == "ensemble" and r["metric"] == "accuracy" and r["split"] == "test"
    ]
    stat = describe(acc)
    assert rows["ensemble"]["test accuracy"] == f"{stat.mean:.4f} ± {stat.half_width:.4f}"
    test = paired_tests(results.records)["ensemble"]
    assert rows["ensemble"]["p (Holm)"] == f"{test.p_holm:.3f}"
    assert rows["joint"]["Δ accuracy vs joint"] == "(reference)"
    times = [
        sum(r["seconds"] for r in rows_) / len(rows_)
        for (m, _), rows_ in results.histories().items()
        if m == "opm"
    ]
    assert rows["opm"]["epoch time"] == f"{sum(times) / len(times):.2f} s"

    errors = error_table({m: a for m, a in results.analyses().items() if "unimodal" not in m})
    header = [c.title for c in errors.columns]
    row = dict(zip(header, errors.rows[0], strict=True))
    counts = [a["errors"]["groups"]["none"]["count"] for a in results.analyses()[errors.rows[0][0]]]
    assert row["samples: all wrong"] == " / ".join(map(str, counts))
    assert row["synergy rate"].endswith("†")  # fewer than 30 samples
    assert any("†" in n for n in errors.notes)

    options = options_table(results.configs(), results.histories())
    by = {r[0]: r[1] for r in options.rows}
    assert "**alpha=1.2**" in by["ogm_ge[alpha=1.2]"]  # not the default: bold
    assert "**strategy=independent**" in by["mcr[strategy=independent]"]
    assert "lam=" in by["mcr[strategy=independent]"]  # defaults are listed too


def test_metrics_pick_the_columns_and_the_report_shows_calibration_and_robustness(
    tmp_path, capsys
) -> None:
    from mmbalance.errors import ConfigError
    from mmbalance.report import (
        calibration_table,
        expand_metrics,
        metrics_table,
        parse_metrics,
        robustness_table,
    )

    root = fake_compare(tmp_path / "cmp", WIDE)
    records = load_result_set(root).records
    picked = parse_metrics("robust_50,ece,missing_50,head")
    assert expand_metrics(picked, records) == [
        "robust_50",
        "ece",
        "missing_audio_50",
        "missing_video_50",
        "head",  # no run recorded a head accuracy: the name stays, as an empty column
    ]
    table = metrics_table(records, picked)
    header = [c.title for c in table.columns]
    assert header == [
        "method",
        "worst missing 50 %",
        "ECE",
        "audio missing 50 %",
        "video missing 50 %",
        "head",
    ]
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in table.rows}
    robust = describe(
        r["value"] for r in records if r["method"] == "opm" and r["metric"] == "robust_50"
    )
    assert rows["opm"]["worst missing 50 %"] == f"{robust.mean:.3f} ± {robust.half_width:.3f}"
    assert rows["opm"]["head"] == "–" and any("No run recorded head" in n for n in table.notes)
    text = to_text(table, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Left out to fit 80 columns: head." in text  # the fifth column gives way first
    compared = comparison_table(records, compared="robust_50")
    header = [c.title for c in compared.columns]
    assert header[2:4] == ["worst missing 50 %", "Δ worst missing 50 % vs joint"]
    test = paired_tests(records, "robust_50")["opm"]
    assert dict(zip(header, compared.rows[-1], strict=True))["p (Holm)"] == f"{test.p_holm:.3f}"
    with pytest.raises(ConfigError, match="names no metric"):
        parse_metrics(" , ")
    with pytest.raises(ConfigError, match="not a metric name"):
        parse_metrics("accuracy,ECE")

    calibration = calibration_table(records)
    assert [c.title for c in calibration.columns][1:4] == [
        "balanced accuracy",
        "ECE",
        "ECE head audio",
    ]
    missing = robustness_table(records, "missing", {"joint": "its latent set to zero"})
    header = [c.title for c in missing.columns]
    assert header[:3] == ["method", "missing modality means", "audio missing 20 %"]
    assert dict(zip(header, missing.rows[0], strict=True))["missing modality means"] == (
        "its latent set to zero"
    )
    assert robustness_table([r for r in records if "missing" not in r["metric"]], "missing") is None

    assert main(["report", str(root), "--metrics", "accuracy,balanced_accuracy"]) == 0
    md = (root / "report.md").read_text()
    assert "## Calibration and robustness" in md and "Noisy modality at test time" in md
    assert "**Picked metrics**" in md.split("## Methods")[0]
    assert "| balanced accuracy |" in md.split("## Methods")[0]  # the picked column
    # each method's rule for a missing modality, from its class
    assert "the average over the heads of the modalities present" in md  # ensemble's
    assert md.count("its latent set to zero before the heads") >= 5
    assert main(["report", str(root), "--metrics", "Accuracy"]) == 2
    assert "not a metric name" in capsys.readouterr().err


# --- the table writer ----------------------------------------------------------------------------
def _wide_table() -> Table:
    columns = [Column("method", "left", essential=True), Column("test accuracy", essential=True)]
    columns += [Column(f"probe m{i}") for i in range(6)]
    rows = [
        [name, "0.8805 ± 0.0123", *(f"0.{i}123 ± 0.0045" for i in range(6))]
        for name in ("joint", "mcr[strategy=independent,lam=0.1]", "ogm_ge[alpha=1.2]")
    ]
    return Table(columns, rows, "A **wide** table", ["A note with `code` in it."])


def test_text_tables_fit_80_columns_without_cutting_numbers() -> None:
    text = to_text(_wide_table(), width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text and "**" not in text and "`" not in text
    assert text.count("0.8805 ± 0.0123") == 3  # every essential number whole
    assert "mcr[strategy=independent,lam=0.1]" in text.replace("\n", "") or "mcr[strategy=" in text
    assert "Left out to fit 80 columns:" in text and "probe m5" in text.split("Left out")[1]
    wide = to_text(_wide_table(), width=200)
    assert "Left out" not in wide and "0.5123 ± 0.0045" in wide


def test_compare_table_in_an_80_column_log_fits(tmp_path) -> None:
    results = load_result_set(fake_compare(tmp_path / "cmp", WIDE))
    text = to_text(comparison_table(results.records), width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    for method in ("joint", "opm", "ensemble"):
        assert method in text
    assert "sig." in text and "p" in text and "Left out" in text


def test_markdown_and_html_writers() -> None:
    table = Table([Column("a|b", "left"), Column("x")], [["`m`", "**1**"]], notes=["n `c`"])
    md = to_markdown(table)
    assert md.splitlines()[:3] == ["| a\\|b | x |", "|---|---:|", "| `m` | **1** |"]
    page = to_html(table, "t")
    assert '<table class="data" id="t">' in page
    assert "<code>m</code>" in page and "<strong>1</strong>" in page and "`" not in page
    assert "<code>c</code>" in page
    with pytest.raises(ValueError):
        Table([Column("a")], [["1", "2"]])


# --- damaged input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "content"),
    [
        ("results.json", '[{"method": "joint", "seed": 0, "split": "te'),
        ("results.json", '[{"method": "joint"}]'),
        ("joint/seed0/analysis.json", '{"errors": {"n": 10'),
        ("joint/seed0/metrics.csv", "epoch,val_accuracy,seconds\n0,0.5,abc\n"),
        ("joint/seed0/config.yaml", "dataset: [unclosed\n"),
    ],
)
def test_damaged_compare_files_give_a_one_line_error(tmp_path, capsys, target, content) -> None:
    root = fake_compare(
        tmp_path / "cmp", {"joint": {"acc": 0.8}, "ensemble": {"acc": 0.8}}, seeds=2
    )
    (root / target).write_text(content)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmbalance: error:")
    assert Path(target).name in err and "Traceback" not in err


@pytest.mark.parametrize("content", ['{"metrics": {"test": {"accuracy": 0.8', '{"metrics": 3}'])
def test_damaged_run_metrics_give_a_one_line_error(tmp_path, capsys, content) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(content)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.json" in err


# --- layers --------------------------------------------------------------------------------------
def test_the_report_imports_nothing_above_it() -> None:
    """Not even inside a function: report may use eval and below, never compare, train, build or
    cli (which import it)."""
    forbidden = ("mmbalance.compare", "mmbalance.train", "mmbalance.builder", "mmbalance.cli")
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"


# --- the page in a browser -----------------------------------------------------------------------
MEASURE = """<script>
window.addEventListener('load', () => {
  const t = document.getElementById('comparison');
  const heads = Array.from(t.querySelectorAll('th'));
  const sig = heads.find(h => h.textContent === 'significant');
  const cells = Array.from(t.querySelectorAll('tbody td'));
  const heights = cells.map(c => c.getBoundingClientRect().height);
  const out = {
    inner: window.innerWidth,
    page: document.documentElement.scrollWidth,
    table_right: t.getBoundingClientRect().right,
    table_scroll: t.scrollWidth,
    sig_right: sig ? sig.getBoundingClientRect().right : -1,
    overflowing: cells.filter(c => c.scrollWidth > c.clientWidth).length,
    row_min: Math.min(...heights), row_max: Math.max(...heights),
    images: Array.from(document.images, i => [i.alt, i.naturalWidth, i.naturalHeight]),
  };
  document.title = 'MEASURE:' + JSON.stringify(out);
});
</script></body>"""


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is not installed")
def test_report_fits_a_1280_pixel_window_in_headless_chromium(tmp_path) -> None:
    root = fake_compare(tmp_path / "cmp", WIDE)
    _, page = write_report(root)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE))
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1280,2000",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    found = re.search(r"<title>MEASURE:(.*?)</title>", dom, re.S)
    assert found, dom[:500]
    m = json.loads(found.group(1).replace("&amp;", "&").replace("&quot;", '"'))
    assert m["inner"] == 1280  # the window is what the test claims
    assert m["page"] <= 1280  # nothing scrolls sideways
    assert m["table_right"] <= 1280 and m["table_scroll"] <= 1280
    assert 0 < m["sig_right"] <= 1280  # the significance column is on screen
    assert m["overflowing"] == 0
    assert m["row_max"] < 1.5 * m["row_min"]  # no cell wraps onto a second line
    # every figure decodes to a real image in the browser
    names = [alt for alt, _, _ in m["images"]]
    assert len(names) == 5 and "Per-modality curves over epochs" in names
    assert all(w > 300 and h > 200 for _, w, h in m["images"]), m["images"]


def test_method_scalars_are_plotted_per_epoch_and_damaged_step_files_refused(tmp_path) -> None:
    from mmbalance.report.plots import plot_method_scalars
    from mmbalance.report.records import read_step_logs

    logs = {
        (method, seed): [
            {"step": 4 * e + i, "epoch": e, "name": f"coeff_{m}", "value": 0.1 * e + seed}
            for e in range(3)
            for i in range(4)
            for m in ("audio", "image")
        ]
        for method in ("ogm", "ogm_ge")
        for seed in (0, 1)
    }
    figure = plot_method_scalars(logs, tmp_path / "scalars.png", ["ogm", "ogm_ge"])
    assert figure is not None and figure.stat().st_size > 1000
    assert plot_method_scalars({}, tmp_path / "none.png") is None
    path = tmp_path / "steps.csv"
    path.write_text("step,epoch,name,value\n0,0,coeff_audio,0.5\n1,0,coeff_audio,x\n")
    with pytest.raises(DataError, match="damaged"):
        read_step_logs(path)
    path.write_text("step,epoch,name,value\n0,0,coeff_audio,0.5\n")
    assert read_step_logs(path) == [{"step": 0, "epoch": 0, "name": "coeff_audio", "value": 0.5}]
