"""Cost of every registered method: step time relative to ``joint`` and peak memory.

One step is :meth:`mmbalance.train.loop.Trainer.train_step`: exactly what training does (the
method's latent transform and losses, its backward and gradient rewrite, clipping, the optimizer
step), on a real ``Trainer`` built the way ``fit`` builds it (``build_method``, ``build_model``,
``method.setup``), on Lightning Fabric with one device. Every method gets its own model, seeded
identically, and all steps of a setting use one fixed batch.

Timing. All methods of a setting are built in one process, each is warmed up, then they are
timed in interleaved rounds: in every round each method runs ``steps`` steps, in an order
shuffled per round, so that load from other processes hits every method alike. A method's time
is the median over rounds of its mean step time; its ratio is that median divided by ``joint``'s.
``ratio_q25`` / ``ratio_q75`` are quartiles of the per-round ratios (method / joint of the same
round), a measure of the noise. Steps use ``epoch = 10`` so that every schedule is active (OPM's
6 warm-up epochs are over; OGM's default window is ``start=0, end=None``).

Methods. Every registered method with its default options (``mcr``: K = 32 permutations), plus
``mmpareto[latent]`` (``method.variant=latent``) and ``mmpareto[floor]``
(:class:`MMParetoFloor`: the summed-loss step of MMPareto's model plus one backward pass of the
fused loss through the encoders, the least any exact per-loss encoder gradient needs; the
records of ``mmpareto`` and of the floor carry ``ratio_to_floor``, target
:data:`FLOOR_TARGET`), and ``mcr[floor]`` (:class:`MCRFloor`: MCR's losses and R_MIPD's
arithmetic by autograd, without the game's routing of the gradient; ``mcr`` and
``mcr[K=k]`` carry ``ratio_to_floor`` against it and ``mcr[K=k][floor]``). ``unimodal`` is timed once, for its first
modality. ``unipre_frozen`` / ``unipre_finetuned`` are timed in their main stage (after the
unimodal pre-training, which they add as a separate stage and which is not timed here);
``unipre_frozen`` has its encoders frozen as ``fit`` does.

Peak memory. Measured per method in a fresh process (forked from a server that has only imported
the libraries): the model, its trainer and the batch are built, then ``mem_steps`` steps run.
``peak_mem_mb`` is the peak during those steps *above* what was in use once model and batch were
built: on CPU the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident size before the steps; on CUDA ``torch.cuda.max_memory_allocated`` (reset
before the steps) minus ``torch.cuda.memory_allocated`` before them. It holds activations,
gradients, optimizer state and whatever the method keeps. ``base_mem_mb`` is the baseline.

Settings:

- ``resnet``: two ResNet-18 encoders (width 64) at the full CREMA-D-like size, audio 1x257x188
  spectrogram and 3 frames of 3x224x224 video, 6 classes, late_sum fusion, the CREMA-D train
  settings (SGD, lr 1e-3, momentum 0.9, weight decay 1e-4), random tensors. Batch 32 on a GPU; on
  CPU ``--resnet-batch`` (default 4, because one batch-32 step takes 60-80 s on the 2 shared
  cores this was written on). The number of rounds is chosen after the warm-up so that the
  setting stays within ``--resnet-budget`` seconds (at least 2 rounds).
- ``small``: the model of the accuracy benchmark: dataset ``synthetic`` with
  ``preset=competition``, its default encoders (MLP 64 -> 128 -> 128 -> 64) and fusion
  (late_sum), batch 32 and its train settings.
- ``sweep_batch``: the small model with ``joint`` and the balancing methods at batch 16, 64, 256.
- ``sweep_modalities``: the same at batch 32 with M = 2..5 synthetic modalities (shares 0.5
  shared + 0.5/M unique each, signal 3 for m1 and 1 for the rest, depth 1 for m1 and 4 for the
  rest).
- ``sweep_mcr_k``: the small model with ``joint`` and ``mcr`` at K = 1, 8, 32, 128
  permutations, at batch 32 and 256 (recorded in the JSON; ``--settings sweep_mcr_k``).

Targets: :data:`TARGETS` per method, overridden per setting (``Setting.targets``; mcr: 1.05 on
the ResNets, 1.5 on the small model at batch 32, 2.0 at batch 256, 4 at M = 5).

This module is the command; its parts live in :mod:`benchmarks.cost`: the settings and the
trainer built for each method (``settings``), timing (``timing``), peak memory (``memory``), the
records and tables (``tables``).

Output: ``cost_cpu.json`` (tidy records) and ``cost_cpu.md`` in ``--out-dir``; on a GPU
``cost_<gpu-name>.json`` / ``.md`` (``--stem`` renames them). Run::

    python3 benchmarks/bench_cost.py [--quick] [--device cuda] [--threads 2]
        [--settings small,sweep_batch] [--methods mcr,mmpareto,mmpareto[floor]] [--compile]

Compiled steps (``--compile``): every entry trains with ``train.compile=true``; each compiles in
a warm-up of its own before the timed rounds, and its records carry ``compile_s`` (the seconds
spent compiling, Dynamo's account) and ``compile_steps`` (that time in compiled steps of the
method: how many steps a run needs before compiling has paid for itself at most that often).
The outputs are ``<stem>_compiled.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` and ``mmbalance`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cost.memory import memory_setting  # noqa: E402
from benchmarks.cost.settings import make_settings  # noqa: E402
from benchmarks.cost.tables import (  # noqa: E402
    cost_markdown,
    cost_text,
    results_stem,
    setting_records,
)
from benchmarks.cost.timing import CLOCKS, print_flushed, time_setting  # noqa: E402
from mmbalance.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run_cost(
    out_dir: str | Path = RESULTS,
    quick: bool = False,
    device: str = "cpu",
    threads: int = 2,
    *,
    settings: Sequence[str] | None = None,
    memory: bool = True,
    resnet_batch: int | None = None,
    resnet_budget: float = 480.0,
    methods: Sequence[str] | None = None,
    stem: str | None = None,
    clock: str = "wall",
    compile: bool = False,
    log: Callable[[str], None] = print_flushed,
) -> list[dict[str, Any]]:
    """Run the cost benchmark, write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``, return
    the records. ``settings`` selects settings by name (default: all), ``methods`` entries by
    label (``joint`` is always kept); ``stem`` names the output files (default
    :func:`results_stem`, with ``_compiled`` when ``compile``); ``compile`` times the compiled
    step (``train.compile=true``) of every entry and records its compile time."""
    torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no GPU is available")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or results_stem(device) + ("_compiled" if compile else "")
    records: list[dict[str, Any]] = []
    for setting in make_settings(quick, device, resnet_batch, resnet_budget):
        if settings is not None and setting.name not in settings:
            continue
        if methods is not None:
            keep = {"joint", *methods}
            setting.entries = [e for e in setting.entries if e.label in keep]
        setting.compile = compile
        # every entry compiles its own graph of the same forward code: let Dynamo keep them all
        torch._dynamo.config.recompile_limit = max(8, 2 * len(setting.entries))
        started = time.perf_counter()
        compile_s: dict[str, float] = {}
        times, shapes = time_setting(setting, device, log, clock, compile_s)
        mem = memory_setting(setting, device, threads) if memory else None
        seconds = time.perf_counter() - started
        new = setting_records(setting, times, shapes, mem, device, threads, seconds, compile_s)
        for r in new:
            r["clock"] = clock
        records += new
        slow = ", ".join(
            f"{r['method']} {r['ratio_to_joint']:.2f}" for r in new if r["method"] != "joint"
        )
        log(
            f"{setting.name} B={setting.batch} M={setting.modalities}: joint "
            f"{new[0]['ms_per_step']:.1f} ms; {slow} ({seconds:.0f} s)"
        )
        # written after every setting, so that an interrupted run keeps what it measured
        write_json_atomic(out_dir / f"{stem}.json", records, indent=2)
        write_text_atomic(out_dir / f"{stem}.md", cost_markdown(records))
    return records


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (seconds), for testing")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--settings", help="comma-separated subset of resnet,small,sweep_batch,...")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--resnet-batch", type=int, help="batch of the resnet setting (CPU: 4)")
    ap.add_argument("--resnet-budget", type=float, default=480.0, help="seconds (CPU)")
    ap.add_argument("--methods", help="comma-separated entry labels to time (joint is kept)")
    ap.add_argument("--stem", help="output file name stem (default: cost_cpu or cost_<gpu>)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="see CLOCKS")
    ap.add_argument(
        "--compile", action="store_true", help="time compiled steps (train.compile=true)"
    )
    args = ap.parse_args(argv)
    started = time.perf_counter()
    records = run_cost(
        args.out_dir,
        args.quick,
        args.device,
        args.threads,
        settings=args.settings.split(",") if args.settings else None,
        memory=not args.no_memory,
        resnet_batch=args.resnet_batch,
        resnet_budget=args.resnet_budget,
        methods=args.methods.split(",") if args.methods else None,
        stem=args.stem,
        clock=args.clock,
        compile=args.compile,
    )
    print(cost_text(records))
    stem = args.stem or results_stem(args.device) + ("_compiled" if args.compile else "")
    print(
        f"wrote {Path(args.out_dir) / stem}.json and .md in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
