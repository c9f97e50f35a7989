"""The command line: happy paths and every error path (one line on stderr, exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST_ARGS as FAST

from mmbalance.cli import main


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith("mmbalance: error: ")
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--method", "nope"], "unknown method 'nope'; valid methods: "),
        (["train", "--dataset", "nope"], "unknown dataset 'nope'; valid datasets: "),
        (["train", "fusion=nope"], "unknown fusion head 'nope'"),
        (["train", "encoder.m1=vgg", *FAST], "unknown encoder 'vgg'"),
        (["train", "encoder.audio=mlp", *FAST], "name modalities ['audio'] that dataset"),
        (["train", "encoder.m1=resnet18", *FAST], "resnet18 needs (C, H, W)"),
        (["train", "train.lrr=1"], "unknown train key 'lrr'; valid keys: epochs, batch_size"),
        (["train", "lr=-1"], "train.lr must be > 0, got -1.0"),
        (["train", "train.optimizer=rmsprop"], "valid optimizers: adam, adamw, sgd"),
        (["train", "train.epochs=many"], "expected an integer"),
        (["train", "method.lam_uni=2"], "unknown method.joint key 'lam_uni'"),
        (["train", "--method", "multiloss", "method.lam_uni=-1"], "lam_uni must be >= 0"),
        (["train", "dataset.shares=[0.5,0.6,0.1]"], "shares must sum to 1"),
        (["train", "bogus=1"], "unknown key 'bogus'; valid keys: dataset"),
        (["train", "noequals"], "expected key=value, got 'noequals'"),
        (["train", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["train", "--method", "multiloss", "unimodal_heads=false"], "needs unimodal heads"),
        (["evaluate", "/nonexistent/run"], "is not a run directory"),
        (["compare", "--methods", "joint,nope", "--out", "/tmp/x"], "unknown method 'nope'"),
        (["compare", "--methods", "joint", "--seeds", "0", "--out", "/tmp/x"], "--seeds must be"),
        # issue 12, items 6 and 9: values that gave tracebacks or trained silently
        (["train", "train.lr=inf"], "train.lr must be finite, got inf"),
        (["train", "train.lr=nan"], "train.lr must be finite, got nan"),
        (["train", "train.weight_decay=inf"], "train.weight_decay must be finite"),
        (["train", "train.seed=-1"], "train.seed must be in [0, 2**32), got -1"),
        (["train", "train.seed=5000000000"], "train.seed must be in [0, 2**32), got 5000000000"),
        (["compare", "--methods", ",", "--out", "/tmp/x"], "--methods ',' names no method"),
        (["compare", "--methods", "ogm_ge[alpha]", "--out", "/tmp/x"], "expected KEY=VALUE"),
    ],
)
def test_error_paths(
    capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)  # a default run directory (runs/...) lands in tmp_path
    assert message in _error(capsys, argv)


def test_nan_loss_exits_with_the_step(capsys, tmp_path: Path) -> None:
    """The message names the step, and a checkpoint only if one exists (issue 12, item 6)."""
    argv = ["train", *FAST, "train.epochs=30", "train.lr=1e6", "train.optimizer=sgd"]
    err = _error(capsys, [*argv, "--out", str(tmp_path)])
    assert "loss became" in err and "step" in err
    if (tmp_path / "last.ckpt").exists():
        assert f"the last good checkpoint is {tmp_path / 'last.ckpt'}" in err
    else:
        assert "no checkpoint was saved" in err and "last.ckpt" not in err


def test_invalid_yaml_config(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert "is not valid YAML" in _error(capsys, ["train", str(bad)])


def test_train_from_yaml_then_evaluate(capsys, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset: {name: synthetic, n_train: 240, n_val: 200, n_test: 400, n_bayes: 2000}\n"
        "method: {name: multiloss, lam_uni: 0.5}\n"
        "fusion: {name: concat_mlp, hidden: 32}\n"
        "train: {epochs: 2, progress: false, tensorboard: false}\n"
    )
    out = tmp_path / "run"
    assert main(["train", str(config), "train.seed=3", "--out", str(out)]) == 0
    saved = (out / "config.yaml").read_text()
    assert "lam_uni: 0.5" in saved and "seed: 3" in saved and "concat_mlp" in saved
    assert main(["evaluate", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed.strip().splitlines()[-1])
    final = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["test"]["accuracy"] == pytest.approx(final["test"]["accuracy"])
    # the saved config trains again as it is
    assert main(["train", str(out / "config.yaml"), "--out", str(tmp_path / "again")]) == 0


def test_compare_writes_tidy_records(capsys, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--dataset",
            "synthetic",
            "--methods",
            "joint,unimodal",
            "--seeds",
            "2",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Bayes accuracy" in printed and "unimodal[m2]" in printed
    records = json.loads((out / "results.json").read_text())
    assert {tuple(sorted(r)) for r in records} == {("method", "metric", "seed", "split", "value")}
    methods = {r["method"] for r in records}
    assert methods == {"joint", "unimodal[m1]", "unimodal[m2]"}
    metrics = {r["metric"] for r in records}
    assert {"accuracy", "macro_f1", "bayes_accuracy"} <= metrics
    assert {"balanced_accuracy", "ece", "missing_m1_50", "noisy_m2_20", "robust_50"} <= metrics
    assert len([r for r in records if r["metric"] == "accuracy" and r["split"] == "test"]) == 6
    assert (out / "report_comparison.png").stat().st_size > 1000
    # re-running reuses finished runs; --metrics picks the columns, the first is compared
    picked = "robust_50,accuracy,ece,head"
    args = ["compare", "--methods", "joint", "--seeds", "2", "--metrics", picked]
    assert main([*args, "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    compared, picked_table = printed.split("Picked metrics")
    assert compared.splitlines()[2].split()[:3] == ["method", "seeds", "50"]  # worst missing 50 %
    assert "worst missing" in picked_table and "ECE" in picked_table
    assert "No run recorded head" in picked_table.replace("\n", " ")  # joint has no heads


def test_list_shows_registries(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ["joint", "multiloss", "ensemble", "synthetic", "resnet18", "late_sum", "film"]:
        assert name in out


def test_overrides_may_sit_between_options() -> None:
    from mmbalance.cli import parse

    args = parse(["train", "--dataset", "synthetic", "a.b=1", "--method", "joint", "c=2"])
    assert args.overrides == ["a.b=1", "c=2"] and args.method == "joint"
    with pytest.raises(SystemExit):
        parse(["train", "--dataset", "synthetic", "a=1", "--bogus", "x"])


def test_regression_compare_table_names_its_probe_score(tmp_path: Path) -> None:
    from mmbalance.report import comparison_table, contribution_table, to_text

    records = [
        {"method": "joint", "seed": 0, "split": "test", "metric": k, "value": v}
        for k, v in (("mae", 0.5), ("pearson", 0.8), ("binary_accuracy", 0.9))
    ]
    records.append(
        {"method": "joint", "seed": 0, "split": "test", "metric": "probe_accuracy_m1", "value": 0.7}
    )
    assert "MAE" in to_text(comparison_table(records), width=100)
    text = to_text(contribution_table(records), width=100)
    assert "probe sign acc m1" in text and "0.700" in text
