"""The cost benchmark's records (one per setting and method) and their tables: Markdown per
setting, pivots for the sweeps, and one text table that fits the terminal."""

from __future__ import annotations

import platform
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from benchmarks.cost.settings import EPOCH, FLOOR_TARGET, FLOORS, NOTES, TARGETS, Setting
from mmbalance.report import Column, Table, to_markdown, to_text


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def results_stem(device: str) -> str:
    """``cost_cpu`` or ``cost_<gpu name slug>``."""
    if not device.startswith("cuda"):
        return "cost_cpu"
    return "cost_" + re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def setting_records(
    setting: Setting,
    times: dict[str, list[float]],
    shapes: dict[str, list[int]],
    memory: dict[str, tuple[float, float]] | None,
    device: str,
    threads: int,
    seconds: float,
    compile_s: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    compile_s = compile_s or {}
    joint = statistics.median(times["joint"])
    # each entry's floor entry (and a floor's own), measured in the same rounds
    labels = {e.label for e in setting.entries}
    floor_of = {e.label: e.label for e in setting.entries if e.method_class is not None}
    for e in setting.entries:
        if e.method_class is None:
            floor = FLOORS.get(e.label)
            own = f"{e.label}[floor]"
            if own in labels:
                floor_of[e.label] = own
            elif floor is not None and floor.label in labels:
                floor_of[e.label] = floor.label
    records = []
    for entry in setting.entries:
        t = times[entry.label]
        med = statistics.median(t)
        per_round = [a / b for a, b in zip(t, times["joint"], strict=True)]
        q25, q75 = _quartiles(per_round)
        target = None
        if entry.method_class is None:
            target = setting.targets.get(entry.method, TARGETS.get(entry.method))
        ratio = med / joint
        base, peak = memory[entry.label] if memory else (None, None)
        to_floor: dict[str, Any] = {}
        if entry.label in floor_of:
            floor = times[floor_of[entry.label]]
            floor_rounds = [a / b for a, b in zip(t, floor, strict=True)]
            f25, f75 = _quartiles(floor_rounds)
            floor_ratio = med / statistics.median(floor)
            is_floor = entry.method_class is not None
            to_floor = {
                "floor": floor_of[entry.label],
                "ratio_to_floor": floor_ratio,
                "floor_q25": f25,
                "floor_q75": f75,
                "floor_target": None if is_floor else FLOOR_TARGET,
                "floor_target_met": None if is_floor else bool(floor_ratio <= FLOOR_TARGET),
            }
        records.append(
            {
                "setting": setting.name,
                "method": entry.label,
                "device": "cuda" if device.startswith("cuda") else "cpu",
                "device_name": device_name(device),
                "batch": setting.batch,
                "modalities": setting.modalities,
                "input_shapes": shapes,
                "ms_per_step": 1e3 * med,
                "ratio_to_joint": ratio,
                "ratio_q25": q25,
                "ratio_q75": q75,
                "peak_mem_mb": peak,
                "base_mem_mb": base,
                "rounds": len(t),
                "steps_per_round": setting.steps,
                "epoch": EPOCH,
                "threads": threads,
                "torch": torch.__version__,
                "method_options": dict(entry.params),
                "target": target,
                "target_met": None if target is None else bool(ratio <= target),
                "note": NOTES.get(entry.label, ""),
                "setting_seconds": seconds,
                "compiled": setting.compile,
                "compile_s": compile_s.get(entry.label),
                # steps after which compiling has cost as much as the steps themselves
                "compile_steps": None
                if entry.label not in compile_s
                else compile_s[entry.label] / med,
                **to_floor,
            }
        )
    return records


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _target_cell(r: dict[str, Any]) -> str:
    if r["target"] is None:
        return ""
    return f"≤ {r['target']:.2f}: {'met' if r['target_met'] else '**missed**'}"


#: The main settings' tables, by setting name: what the setting is.
SETTING_TITLES = {
    "resnet": "two ResNet-18 encoders, late_sum, random data",
    "small": "the accuracy benchmark's model (synthetic, preset=competition, MLP encoders)",
}
#: The sweeps' pivot tables: setting name, record key, column label.
SWEEPS = (("sweep_batch", "batch", "batch"), ("sweep_modalities", "modalities", "M"))


def setting_table(rows: Sequence[dict[str, Any]]) -> Table:
    """One main setting: per method its step time, ratio to joint, IQR, peak memory, target;
    for compiled steps also the compile time and its equivalent in steps."""
    compiled = any(r.get("compiled") for r in rows)
    columns = [
        Column("method", "left", essential=True),
        Column("ms / step"),
        Column("ratio to joint", essential=True),
        Column("IQR", "left"),
        Column("peak mem MB"),
        *([Column("compile s"), Column("= steps")] if compiled else []),
        Column("target", "left", essential=True),
        Column("note", "left", wrap=True),
    ]
    cells = [
        [
            r["method"],
            f"{r['ms_per_step']:.2f}",
            f"{r['ratio_to_joint']:.3f}",
            f"{r['ratio_q25']:.2f}–{r['ratio_q75']:.2f}",
            _fmt(r["peak_mem_mb"], ".0f"),
            *(
                [_fmt(r.get("compile_s"), ".1f"), _fmt(r.get("compile_steps"), ".0f")]
                if compiled
                else []
            ),
            _target_cell(r),
            r["note"],
        ]
        for r in rows
    ]
    return Table(columns, cells)


def sweep_table(rows: Sequence[dict[str, Any]], key: str, label: str) -> Table:
    """A sweep as a pivot: one row per method, one column per value of ``key``; cells are the
    ratio to joint (peak memory MB), joint's row gives its ms / step."""
    values = sorted({r[key] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r[key]): r for r in rows}
    columns = [Column("method", "left", essential=True)]
    columns += [Column(f"{label} = {v}") for v in values]
    columns.append(Column("target", "left"))
    cells = []
    for m in methods:
        row = [m]
        for v in values:
            r = cell.get((m, v))
            if r is None:
                row.append("")
            elif m == "joint":
                row.append(f"{r['ms_per_step']:.2f} ms ({_fmt(r['peak_mem_mb'], '.1f')})")
            else:
                mark = "" if r["target_met"] in (None, True) else " ✗"
                row.append(f"{r['ratio_to_joint']:.2f}{mark} ({_fmt(r['peak_mem_mb'], '.1f')})")
        target = TARGETS.get(m)
        cells.append([*row, "" if target is None else f"{target:g}"])
    return Table(columns, cells)


def cost_markdown(records: Sequence[dict[str, Any]]) -> str:
    """Markdown tables of the records: one per main setting, pivots for the sweeps."""
    if not records:
        return "No cost records.\n"
    first = records[0]
    compiled = ", compiled steps (train.compile=true)" if first.get("compiled") else ""
    lines = [
        f"# Step cost relative to joint ({first['device']}: {first['device_name']}, "
        f"{first['threads']} threads, torch {first['torch']}{compiled})",
        "",
        "Ratio = median step time (`Trainer.train_step`, epoch "
        f"{first['epoch']}) / joint's median, methods interleaved in rounds on the same model "
        "and batch; IQR = quartiles of the per-round ratios. Peak memory = peak during a few "
        "steps above the memory in use once model and batch are built (CPU: resident set "
        "size; CUDA: allocated), each method in a fresh process. Generated by "
        "`benchmarks/bench_cost.py`.",
        *(
            [
                "Compiled steps: *compile s* = seconds spent compiling (before the timed "
                "rounds, not in the ratios); *= steps*: that time in the method's compiled steps.",
            ]
            if compiled
            else []
        ),
        "",
    ]
    for name in [n for n in SETTING_TITLES if any(r["setting"] == n for r in records)]:
        rows = [r for r in records if r["setting"] == name]
        r0 = rows[0]
        inputs = " + ".join(
            f"{m} {'x'.join(map(str, s))}" for m, s in r0.get("input_shapes", {}).items()
        )
        lines += [
            f"## {name}: {SETTING_TITLES[name]}; inputs {inputs}; batch {r0['batch']}",
            "",
            f"{r0['rounds']} rounds of {r0['steps_per_round']} step(s) per method; "
            f"{r0['setting_seconds']:.0f} s.",
            "",
            to_markdown(setting_table(rows)),
            "",
        ]
    for name, key, label in SWEEPS:
        rows = [r for r in records if r["setting"] == name]
        if not rows:
            continue
        what = "M = 2 (competition preset)" if key == "batch" else "batch 32"
        lines += [
            f"## Ratio to joint against {label} (small model, {what})",
            "",
            "Cells: ratio (peak memory MB); the joint row gives its ms / step.",
            "",
            to_markdown(sweep_table(rows, key, label)),
            "",
        ]
    lines.append("✗: above the target.")
    return "\n".join(lines) + "\n"


def _setting_label(r: Mapping[str, Any]) -> str:
    return f"{r['setting']} (B={r['batch']}, M={r['modalities']})"


def compiled_table(
    eager: Sequence[Mapping[str, Any]], compiled: Sequence[Mapping[str, Any]]
) -> Table:
    """Eager against compiled steps, per setting and method measured both ways: the ratio to
    joint of each (each against joint stepped the same way, in its own run), the method's
    compiled step time over its eager one, and the compile time with the steps it takes
    to earn back (``compile s / (eager ms - compiled ms)``; "never" when compiling is not
    faster)."""

    def key(r: Mapping[str, Any]) -> tuple[Any, ...]:
        return (r["setting"], r["batch"], r["modalities"], r["method"])

    eager_by = {key(r): r for r in eager}
    columns = [
        Column("setting", "left", essential=True),
        Column("method", "left", essential=True),
        Column("eager: ratio to joint", essential=True),
        Column("compiled: ratio to joint", essential=True),
        Column("compiled ÷ eager ms"),
        Column("compile s"),
        Column("steps to earn it back"),
    ]
    cells = []
    for c in compiled:
        e = eager_by.get(key(c))
        if e is None:
            continue
        saved_ms = e["ms_per_step"] - c["ms_per_step"]
        compile_s = c.get("compile_s")
        if compile_s is None:
            back = "–"
        elif saved_ms <= 0:
            back = "never"
        else:
            back = f"{compile_s * 1000 / saved_ms:,.0f}"
        cells.append(
            [
                _setting_label(c),
                c["method"],
                f"{e['ratio_to_joint']:.2f}",
                f"{c['ratio_to_joint']:.2f}",
                f"{c['ms_per_step'] / e['ms_per_step']:.2f}",
                _fmt(compile_s, ".1f"),
                back,
            ]
        )
    return Table(columns, cells)


def cost_text(records: Sequence[dict[str, Any]], width: int | None = None) -> str:
    """The records as one text table that fits the terminal (80 columns in a log)."""
    columns = [
        Column("setting", "left", essential=True),
        Column("method", "left", essential=True),
        Column("B"),
        Column("M"),
        Column("ms/step"),
        Column("ratio", essential=True),
        Column("IQR", "left"),
        Column("peak MB"),
        Column("target", "left", essential=True),
    ]
    rows = [
        [
            r["setting"],
            r["method"],
            str(r["batch"]),
            str(r["modalities"]),
            f"{r['ms_per_step']:.2f}",
            f"{r['ratio_to_joint']:.3f}",
            f"{r['ratio_q25']:.2f}–{r['ratio_q75']:.2f}",
            _fmt(r["peak_mem_mb"], ".1f"),
            _target_cell(r),
        ]
        for r in records
    ]
    return to_text(Table(columns, rows, "Step cost relative to joint"), width)
