"""The Weights & Biases callback, in W&B's offline mode: what it logs is read back from the
offline run's transaction log and compared with the run directory's own files."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_callbacks import FAST as CALLBACKS_RUN

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.train import default_callbacks, fit
from mmbalance.train.callbacks import WandB

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as wandb_pb  # noqa: E402

#: the callbacks tests' short run (its method, ``ogm_ge``, logs per-step scalars), logged to W&B
FAST: dict[str, Any] = {**CALLBACKS_RUN, "train.epochs": 2, "train.wandb": "mmbalance-test"}


def offline_records(run_file: Path) -> list[Any]:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then the
    LevelDB log format, 32 KiB blocks of chunks ``crc32, length, type`` (1 full, 2 first, 3
    middle, 4 last) holding serialized ``Record`` protobufs."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunk, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_logs_each_epoch_row_the_step_scalars_config_and_final_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    cfg = resolve_config(FAST)
    assert any(isinstance(c, WandB) for c in default_callbacks(cfg))
    run_dir = tmp_path / "cmp" / "ogm_ge-seed0"
    result = fit(cfg, run_dir)
    wandb.teardown()  # the W&B service writes the offline log asynchronously: wait for it

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = offline_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r, k in zip(records, kinds, strict=True) if k == "run"]
    assert (run.project, run.display_name, run.run_group) == (
        "mmbalance-test",
        "ogm_ge-seed0",
        "cmp",
    )
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: config[k] for k in saved} == saved

    history = [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r, k in zip(records, kinds, strict=True)
        if k == "history"
    ]
    rows = [h for h in history if "epoch" in h]
    steps = [h for h in history if "global_step" in h]
    with open(run_dir / "metrics.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    assert len(rows) == len(expected) == 2
    for logged, row in zip(rows, expected, strict=True):
        for key, value in row.items():
            assert logged[key] == pytest.approx(float(value), rel=1e-12, abs=0), key
    with open(run_dir / "steps.csv", newline="") as f:
        step_rows = list(csv.DictReader(f))
    logged_steps = {
        (h["global_step"], k.removeprefix("step/")): v
        for h in steps
        for k, v in h.items()
        if k.startswith("step/")
    }
    assert len(logged_steps) == len(step_rows) > 0
    for r in step_rows:
        assert logged_steps[(int(r["step"]), r["name"])] == pytest.approx(float(r["value"]))

    summary: dict[str, Any] = {}
    for r, k in zip(records, kinds, strict=True):
        if k == "summary":
            summary |= {_key(i): json.loads(i.value_json) for i in r.summary.update}
    assert summary["test_accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert summary["val_loss"] == pytest.approx(result.metrics["val"]["loss"])
    assert summary["best_epoch"] == result.best_epoch
    assert "exit" in kinds  # the run was finished


def test_wandb_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'mmbalance\[wandb\]'"):
        default_callbacks(resolve_config(FAST))


def test_wandb_is_a_presentation_key_a_resume_may_change() -> None:
    from mmbalance.config import PRESENTATION_KEYS

    assert "train.wandb" in PRESENTATION_KEYS


@pytest.mark.parametrize("project", ["", ":", "a/b", " padded"])
def test_a_project_name_w_and_b_would_refuse_is_one_line_before_training(project: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config({**CALLBACKS_RUN, "train.wandb": project})
    assert "train.wandb" in str(err.value) and "\n" not in str(err.value)


def test_w_and_b_without_an_account_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no stored login
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = resolve_config({**CALLBACKS_RUN, "train.wandb": "mmbalance-test"})
    with pytest.raises(ConfigError) as err:
        fit(cfg, tmp_path / "run")
    message = str(err.value)
    assert "W&B could not start" in message and "WANDB_MODE=offline" in message
    assert "\n" not in message
