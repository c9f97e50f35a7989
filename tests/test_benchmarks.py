"""The benchmarks: the cost benchmark runs and renders its records; the results page
(``benchmarks/run_results.py``) searches, runs and regenerates ``docs/results.md``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is a package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_cost import run_cost  # noqa: E402
from benchmarks.cost.memory import memory_setting  # noqa: E402
from benchmarks.cost.settings import TimedMethod, make_settings  # noqa: E402
from mmbalance.methods import METHODS  # noqa: E402


def test_run_cost_quick_covers_every_method(tmp_path: Path) -> None:
    records = run_cost(tmp_path, quick=True, threads=1, settings=["small"], memory=False)
    methods = {r["method"] for r in records}
    assert set(METHODS.names()) <= methods
    assert all(r["ms_per_step"] > 0 and r["ratio_to_joint"] > 0 for r in records)
    joint = [r for r in records if r["method"] == "joint"]
    assert len(joint) == 1 and joint[0]["ratio_to_joint"] == 1.0
    assert json.loads((tmp_path / "cost_cpu.json").read_text()) == records
    table = (tmp_path / "cost_cpu.md").read_text()
    assert "| mcr |" in table and "≤ 1.50" in table
    floor = {r["method"]: r for r in records if "ratio_to_floor" in r}
    assert set(floor) == {"mmpareto", "mmpareto[floor]", "mcr", "mcr[floor]"}
    assert floor["mmpareto[floor]"]["ratio_to_floor"] == 1.0
    assert floor["mcr"]["floor"] == "mcr[floor]" and floor["mcr[floor]"]["ratio_to_floor"] == 1.0


def test_mcr_floor_computes_mcrs_regulariser(tmp_path: Path) -> None:
    """The floor entry of MCR runs the same arithmetic: its R_MIPD has MCR's value on the same
    donors (only the routing of the gradient differs), for 2 and 3 modalities."""
    from benchmarks.cost.settings import MCRFloor, build_run

    for setting in make_settings(True, "cpu"):
        if setting.name not in ("small", "sweep_modalities"):  # M = 2 and 3
            continue
        trainer, batch, _ = build_run(setting, TimedMethod("mcr", "mcr"), "cpu", tmp_path)
        method = trainer.method
        floor = MCRFloor(method.params)
        floor.setup(method.info)
        ctx = trainer.protocol.context(batch.targets, batch.inputs, 10)
        output = trainer.protocol.module.output(batch.inputs, ctx)
        mods = output.modalities
        k = method.params.num_permutations
        donors = {
            m: torch.stack([torch.randperm(batch.targets.shape[0]) for _ in range(k)]) for m in mods
        }
        torch.testing.assert_close(
            floor.mipd(output, ctx, donors), method.mipd(output, ctx, donors)
        )


def test_run_cost_times_compiled_steps(tmp_path: Path, monkeypatch) -> None:
    from mmbalance.train import compiling

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")  # the cheapest complete compile
    records = run_cost(
        tmp_path,
        quick=True,
        threads=1,
        settings=["small"],
        memory=False,
        methods=["ogm_ge"],
        compile=True,
    )
    assert {r["method"] for r in records} == {"joint", "ogm_ge"}
    assert all(r["compiled"] and r["compile_s"] > 0 and r["compile_steps"] > 0 for r in records)
    table = (tmp_path / "cost_cpu_compiled.md").read_text()
    assert "compiled steps" in table and "compile s" in table


def test_run_cost_resnet_setting_builds_methods_with_their_own_head_or_held_out_data(
    tmp_path: Path,
) -> None:
    """The ResNet setting fixes a fusion head and uses random data: a method defined on its own
    head (mmcosine) keeps it, and methods that hold out part of the training split (gblending,
    lfm) find enough samples."""
    wanted = ["mmcosine", "gblending", "lfm"]
    records = run_cost(
        tmp_path, quick=True, threads=1, settings=["resnet"], memory=False, methods=wanted
    )
    assert {r["method"] for r in records} == {"joint", *wanted}
    cosine = next(r for r in records if r["method"] == "mmcosine")
    assert cosine["ms_per_step"] > 0


def test_peak_memory_in_a_fresh_process() -> None:
    setting = next(s for s in make_settings(True, "cpu") if s.name == "small")
    setting.entries = [TimedMethod("joint", "joint"), TimedMethod("mcr", "mcr")]
    memory = memory_setting(setting, "cpu", threads=1)
    assert set(memory) == {"joint", "mcr"}
    for base, peak in memory.values():
        assert base > 0 and peak >= 0


# --- rendering -----------------------------------------------------------------------------------
RESULTS = ROOT / "benchmarks" / "results"


def test_cost_tables_render_the_committed_records_as_committed() -> None:
    """The table writer renders ``cost_cpu.json`` exactly as the committed ``cost_cpu.md``."""
    from benchmarks.cost.tables import cost_markdown, cost_text

    records = json.loads((RESULTS / "cost_cpu.json").read_text())
    assert cost_markdown(records) == (RESULTS / "cost_cpu.md").read_text()
    text = cost_text(records, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "**" not in text
    assert "missed" in text and "sweep_modalities" in text


def test_compiled_table_pairs_each_method_with_its_eager_step() -> None:
    """Each compiled record sits beside the eager record of the same setting and method; the
    steps to earn the compile time back are that time over the milliseconds saved per step."""
    from benchmarks.cost.tables import compiled_table

    def record(method: str, ms: float, ratio: float, compile_s: float | None = None) -> dict:
        out = {"setting": "small", "batch": 32, "modalities": 2, "method": method}
        return {**out, "ms_per_step": ms, "ratio_to_joint": ratio, "compile_s": compile_s}

    eager = [record("joint", 1.0, 1.0), record("mcr", 2.4, 2.4), record("ogm", 1.5, 1.5)]
    compiled = [
        record("joint", 0.8, 1.0, 12.0),
        record("mcr", 1.2, 1.5, 30.0),
        record("ogm", 1.6, 2.0, 9.0),
        record("dgl", 1.0, 1.25, 5.0),  # not measured eager: left out
    ]
    rows = {r[1]: r for r in compiled_table(eager, compiled).rows}
    assert set(rows) == {"joint", "mcr", "ogm"}
    assert rows["mcr"][:5] == ["small (B=32, M=2)", "mcr", "2.40", "1.50", "0.50"]
    assert rows["mcr"][6] == f"{30.0 * 1000 / (2.4 - 1.2):,.0f}"  # 25,000 steps
    assert rows["joint"][6] == f"{12.0 * 1000 / (1.0 - 0.8):,.0f}"
    assert rows["ogm"][6] == "never"  # compiled is slower per step


def test_results_page_regenerates_the_committed_accuracy_section(tmp_path: Path) -> None:
    """``docs/results.md`` is what the page code makes of the committed results (the figures
    are not redrawn here), and its p-values are scipy's paired t-tests, Holm-adjusted."""
    from scipy import stats

    from benchmarks.results_page.page import write_docs

    saved = json.loads((RESULTS / "accuracy.json").read_text())
    cost = json.loads((RESULTS / "cost_cpu.json").read_text())
    page = write_docs(saved, cost, docs=tmp_path, draw=False).read_text()
    committed = (ROOT / "docs" / "results.md").read_text()
    assert page.split("## Accuracy")[1] == committed.split("## Accuracy")[1]
    assert "## Cost" in page and "| mcr |" in page

    # u1=0.15 of the sweep: mcr against joint, by hand
    records = [r for r in saved["records"] if r["study"] == "synthetic" and r["point"] == "u1=0.15"]

    def accuracy(method: str) -> list[float]:
        rows = [r for r in records if r["method"] == method and r["metric"] == "accuracy"]
        return [r["value"] for r in sorted(rows, key=lambda r: r["seed"]) if r["split"] == "test"]

    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "joint"))
    raw = sorted((stats.ttest_rel(accuracy(m), accuracy("joint")).pvalue, m) for m in methods)
    holm, running = {}, 0.0
    for i, (p, m) in enumerate(raw):
        running = max(running, min(1.0, (len(raw) - i) * p))
        holm[m] = running
    section = page.split("#### u1=0.15")[1].split("####")[0]
    row = next(line for line in section.splitlines() if line.startswith("| `ogm` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == ("<0.001" if holm["ogm"] < 0.001 else f"{holm['ogm']:.3f}")
    diffs = [a - b for a, b in zip(accuracy("ogm"), accuracy("joint"), strict=True)]
    half = stats.t.ppf(0.975, len(diffs) - 1) * stats.tstd(diffs) / len(diffs) ** 0.5
    assert f"{sum(diffs) / len(diffs):+.4f} ± {half:.4f}" in cells[5]


#: A one-epoch synthetic run of a few hundred samples.
TINY = {
    "dataset": "synthetic",
    "dataset.n_train": 120,
    "dataset.n_val": 100,
    "dataset.n_test": 200,
    "dataset.n_bayes": 500,
    "train.epochs": 1,
    "train.tensorboard": False,
}


def test_accuracy_runner_searches_on_validation_and_records_seeds(tmp_path: Path) -> None:
    from benchmarks.results_page.runner import run_accuracy
    from benchmarks.results_page.studies import Point, Study

    study = Study("tiny", "Tiny", "a tiny synthetic setting", (Point("default", TINY),))
    threads = torch.get_num_threads()  # one worker in this process: it sets one thread
    try:
        saved = run_accuracy(
            tmp_path / "runs", 1, 2, [study], methods=["joint"], results=tmp_path / "results"
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "results" / "accuracy.json").read_text()) == saved
    (search,) = saved["search"]
    assert search["method"] == "joint" and search["option"] == "train.lr"
    # the chosen candidate is the best on validation (the rule of compare --search)
    scores = {float(k): v for k, v in search["scores"].items()}
    assert scores[search["chosen"]] == max(scores.values())
    test = [r for r in saved["records"] if r["split"] == "test" and r["metric"] == "accuracy"]
    assert sorted(r["seed"] for r in test) == [0, 1]
    metrics = {r["metric"] for r in saved["records"]}
    assert {"diverged", "synergy_samples", "routing_samples", "bayes_accuracy"} <= metrics
    assert {"balanced_accuracy", "ece", "missing_m1_50", "noisy_m2_50", "robust_50"} <= metrics
    samples = [
        r["value"]
        for r in saved["records"]
        if r["metric"] in ("synergy_samples", "routing_samples")
    ]
    assert sum(samples) == 2 * 200  # the two groups partition each seed's test samples
    assert not [r for r in saved["records"] if r["split"] == "val" and r["metric"] != "accuracy"]
    # --collect-only: nothing trains, the finished runs give the same records
    collected = run_accuracy(
        tmp_path / "runs", 1, 2, [study], ["joint"], train=False, results=tmp_path / "again"
    )
    assert collected["records"] == saved["records"] and collected["missing"] == 0
    assert collected["search"] == saved["search"]


def test_regenerating_some_studies_keeps_the_others() -> None:
    from benchmarks.results_page.runner import merge_saved

    def saved(study: str, value: float, runs: int) -> dict:
        record = {"study": study, "method": "joint", "metric": "accuracy", "value": value}
        info = {"seeds": 5, "runs": runs, "missing": 0, "workers": 2, "minutes": 1.0}
        return {**info, "search": [{"study": study}], "records": [record], "curves": {study: {}}}

    first = merge_saved(merge_saved(None, saved("a", 0.1, 3)), saved("b", 0.2, 4))
    again = merge_saved(first, saved("a", 0.3, 5))
    assert sorted((r["study"], r["value"]) for r in again["records"]) == [("a", 0.3), ("b", 0.2)]
    assert [s["study"] for s in again["search"]] == ["b", "a"]
    assert again["studies"]["a"]["runs"] == 5 and again["studies"]["b"]["runs"] == 4
    assert again["runs"] == 9 and set(again["curves"]) == {"a", "b"}


def test_gap_closed_and_epoch_cost_follow_their_formulas() -> None:
    from benchmarks.results_page.page import epoch_cost, gap_table

    means = {"joint": 0.80, "ensemble": 0.90, "mcr": 0.86, "ogm": 0.78}
    records = [
        {"method": m, "seed": s, "split": "test", "metric": "accuracy", "value": v + d}
        for m, v in means.items()
        for s, d in enumerate((-0.001, 0.0, 0.001))
    ]
    table, summary = gap_table(records, {"joint": 1.0, "mcr": 1.5})
    rows = {r[0]: r for r in table.rows}
    assert rows["`mcr`"][2] == f"{100 * (0.86 - 0.80) / (0.90 - 0.80):.0f} %"  # 60 %
    assert rows["`ogm`"][2] == "-20 %" and rows["`ensemble`"][2] == "100 %"
    assert rows["`mcr`"][3] == "above" and rows["`ogm`"][3] == "below"
    assert rows["`mcr`"][5] == "1.50" and rows["`ogm`"][5] == "-"
    assert "`mcr`'s, 0.8600, closing 60 % of the gap" in summary
    curves = {
        "joint|0": [{"seconds": 2.0}, {"seconds": 2.0}],
        "joint|1": [{"seconds": 4.0}],
        "joint|2": [{"seconds": 3.0}],
        "dr|0": [{"seconds": 6.0}, {"seconds": 3.0}],
    }
    assert epoch_cost(curves) == {"joint": 1.0, "dr": 1.5}


def test_weak_probe_sentence_reads_the_last_epoch_of_the_curves() -> None:
    from benchmarks.results_page.page import _weak_probe_sentence, final_probes

    def rows(audio: float, image: float) -> list[dict]:
        first = {"epoch": 0.0, "val_probe_acc_audio": 0.1, "val_probe_acc_image": 0.1}
        last = {"epoch": 1.0, "val_probe_acc_audio": audio, "val_probe_acc_image": image}
        return [first, last]

    curves = {
        "joint|0": rows(0.50, 0.80),
        "joint|1": rows(0.60, 0.80),
        "mcr|0": rows(0.70, 0.80),
        "ogm|0": rows(0.40, 0.80),
        "ensemble|0": rows(0.90, 0.80),  # a reference: not counted
    }
    assert final_probes(curves)["joint"] == {"audio": 0.55, "image": 0.80}
    sentence = _weak_probe_sentence(curves)
    assert "joint's audio encoder has a validation probe of 0.55" in sentence
    assert "1 of the 2 balancing methods end with a higher one (median 0.70)" in sentence


def test_the_recent_set_expands_and_runs_in_both_arms_of_the_regime() -> None:
    from benchmarks.results_page.studies import RECENT, SGD_ARM, STUDIES
    from mmbalance.compare import METHOD_SETS, split_methods

    assert METHOD_SETS["recent"] == RECENT == ("aug", "dgl", "g2d", "remix", "midas")
    assert all(m in METHODS for m in RECENT)
    assert split_methods("joint,ensemble,mcr,recent") == ["joint", "ensemble", "mcr", *RECENT]
    regime = {s.name: s for s in STUDIES}
    assert regime["av-fashion-cnn"].methods is None  # every registered method
    assert set(RECENT) <= set(SGD_ARM) == set(regime["av-fashion-cnn-sgd"].methods or ())


def test_robustness_study_says_which_methods_depend_less_on_the_dominant_modality() -> None:
    from benchmarks.results_page.page import robustness_study
    from mmbalance.report import describe

    # joint leans on the image (Shapley 0.6); mcr keeps more without it, ogm less
    means = {
        "joint": (0.90, 0.60, 0.88),
        "ensemble": (0.93, 0.80, 0.90),
        "mcr": (0.91, 0.70, 0.89),
        "ogm": (0.88, 0.55, 0.87),
        "mla": (0.90, 0.61, 0.88),
    }
    records = []
    for i, (m, (acc, no_image, no_audio)) in enumerate(means.items()):
        for seed in range(3):
            noise = ((7 * i + 3 * seed) % 5 - 2) * 0.004  # differs between methods
            for metric, v in (
                ("accuracy", acc),
                ("missing_image_50", no_image + noise),
                ("missing_audio_50", no_audio - noise),
                ("shapley_image", 0.6),
                ("shapley_audio", 0.2),
            ):
                records.append(
                    {"method": m, "seed": seed, "split": "test", "metric": metric, "value": v}
                )
    table, text = robustness_study(records)
    header = [c.title for c in table.columns]
    assert header[:4] == ["method", "missing modality means", "test accuracy", "image missing 50 %"]
    rows = {r[0]: dict(zip(header, r, strict=False)) for r in table.rows}
    assert rows["`ensemble`"]["missing modality means"] == (
        "the average over the heads of the modalities present"
    )
    joint = describe(
        r["value"] for r in records if r["method"] == "joint" and r["metric"] == "missing_image_50"
    )
    assert rows["`joint`"]["image missing 50 %"] == f"{joint.mean:.3f} ± {joint.half_width:.3f}"
    assert "Joint depends most on the image (Shapley value 0.60, audio 0.20)" in text
    assert f"joint falls from 0.900 to {joint.mean:.3f}" in text
    assert "1 of the 3 balancing methods keep significantly more accuracy than joint" in text
    assert "keep significantly more accuracy than joint (`mcr`)" in text
    assert "significantly less (`ogm`)" in text
    assert "the highest accuracy without the image is `mcr`'s, 0.70" in text
    assert "The ensemble, which without a modality averages the heads present, keeps 0.7" in text
    assert robustness_study([r for r in records if "missing" not in r["metric"]]) is None


def test_runs_trained_before_the_metrics_beyond_accuracy_get_them_once(tmp_path: Path) -> None:
    from benchmarks.results_page.runner import with_beyond_accuracy
    from mmbalance.builder import resolve_config
    from mmbalance.train import fit

    result = fit(resolve_config({**TINY, "train.progress": False}), tmp_path / "run")
    test = result.metrics["test"]
    later = ("missing_", "noisy_", "robust_", "balanced_accuracy", "ece")
    old = {k: v for k, v in test.items() if not k.startswith(later)}
    assert "ece" not in old and "robust_50" not in old and "accuracy" in old
    summary = {**result.to_json(), "metrics": {**result.metrics, "test": old}}
    again = with_beyond_accuracy(summary, tmp_path / "run")
    assert again["metrics"]["test"] == test  # the same weights give the same numbers
    assert (tmp_path / "run" / "beyond_accuracy.json").is_file()
    assert with_beyond_accuracy(summary, tmp_path / "run") == again  # read back
