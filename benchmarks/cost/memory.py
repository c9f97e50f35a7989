"""Peak memory of each method of a setting, each in a fresh process forked from a server that has
only imported the libraries."""

from __future__ import annotations

import gc
import multiprocessing as mp
import tempfile
from pathlib import Path

import torch

from benchmarks.cost.settings import EPOCH, Setting, TimedMethod, build_run


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _memory_child(
    setting: Setting, entry: TimedMethod, device: str, threads: int
) -> tuple[float, float]:
    """In a fresh process: (baseline MB, peak MB above the baseline) of ``mem_steps`` steps."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, batch, subset = build_run(setting, entry, device, Path(tmp))
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current
            base = 1024 * _status_kb("VmRSS")
        for _ in range(setting.mem_steps):
            trainer.train_step(batch, EPOCH, subset=subset)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = 1024 * _status_kb("VmHWM")
    return base / 2**20, (peak - base) / 2**20


def memory_setting(setting: Setting, device: str, threads: int) -> dict[str, tuple[float, float]]:
    """Peak memory of each entry, each in its own fresh process."""
    # children fork from a server that has imported the libraries (no effect once it runs)
    mp.set_forkserver_preload(["torch", "lightning.fabric", "mmbalance.train.loop", __name__])
    ctx = mp.get_context("forkserver")
    out = {}
    for entry in setting.entries:
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            out[entry.label] = pool.apply(_memory_child, (setting, entry, device, threads))
    return out
