"""Timing the methods of a setting side by side: interleaved rounds on the same model and batch,
each method's rounds in a shuffled order, so that load from other processes hits every method
alike."""

from __future__ import annotations

import gc
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.cost.settings import EPOCH, Setting, build_run


def print_flushed(message: str) -> None:
    print(message, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: ``wall``: elapsed time (what a user waits for); ``thread``: CPU time of the timing thread
#: (``time.thread_time``), which does not count waiting for a core on a shared machine; with
#: ``--threads 1`` it is the whole compute of the step (with more threads it misses the
#: intra-op workers' share), so it measures cost robustly under load.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def time_setting(
    setting: Setting,
    device: str,
    log: Callable[[str], None] = print_flushed,
    clock: str = "wall",
    compile_s: dict[str, float] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Interleaved timing: seconds per step of every round, per label; and the input shapes.
    With ``setting.compile``, the seconds each label spent compiling go into ``compile_s``
    (compiling happens in a warm-up of its own, before the timed rounds)."""
    now = CLOCKS[clock]
    compile_s = {} if compile_s is None else compile_s
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {e.label: build_run(setting, e, device, Path(tmp)) for e in setting.entries}

        def timed(label: str, steps: int) -> float:
            trainer, batch, subset = runs[label]
            _sync(device)
            t0 = now()
            for _ in range(steps):
                trainer.train_step(batch, EPOCH, subset=subset)
            _sync(device)
            return (now() - t0) / steps

        data = next(iter(runs.values()))[0].data
        shapes = {m: list(spec.shape) for m, spec in data.modalities.items()}
        if setting.compile:  # compiling happens here, outside the rounds and the budget
            for label in runs:
                timed(label, setting.warmup)
                compiler = runs[label][0].compiler
                compile_s[label] = (compiler.seconds if compiler is not None else None) or 0.0
        warm = {label: timed(label, setting.warmup) for label in runs}
        rounds = setting.rounds
        if setting.budget_s is not None:
            per_round = sum(warm.values()) * setting.steps
            # memory: a build (a few seconds) plus ``mem_steps`` steps per method
            memory = sum(warm.values()) * setting.mem_steps + 5.0 * len(runs)
            left = setting.budget_s - (time.perf_counter() - started) - memory
            rounds = max(setting.min_rounds, min(rounds, int(left // per_round)))
            log(
                f"  {setting.name}: warm-up steps took {sum(warm.values()):.1f} s in all; "
                f"{rounds} rounds fit the {setting.budget_s:.0f} s budget"
            )
        times: dict[str, list[float]] = {label: [] for label in runs}
        labels = list(runs)
        for r in range(rounds):
            random.Random(r).shuffle(labels)
            for label in labels:
                times[label].append(timed(label, setting.steps))
        runs.clear()
    gc.collect()
    return times, shapes
