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
:data:`FLOOR_TARGET`). ``unimodal`` is timed once, for its first
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
import gc
import json
import multiprocessing as mp
import platform
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor

from mmbalance.build import build_components, build_dataset, resolve_config
from mmbalance.data.base import Batch, DatasetBundle, ModalitySpec, MultimodalTensorDataset
from mmbalance.methods import METHODS
from mmbalance.methods.base import Method, StepContext, total_loss
from mmbalance.methods.mcr import MCR
from mmbalance.methods.mmpareto import MMPareto
from mmbalance.methods.ops.divergence import divergence_rows
from mmbalance.models.output import ModelOutput
from mmbalance.report import Column, Table, to_markdown, to_text
from mmbalance.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"

#: Epoch passed to ``train_step``: late enough that every method's modulation is active.
EPOCH = 10
#: Targets of the benchmark issues: a method's step time over joint's must not exceed these
#: (``Setting.targets`` overrides them per setting; mcr's depend on the setting).
TARGETS = {"ogm": 1.05, "ogm_ge": 1.05, "opm": 1.05, "mmpareto": 1.6}
#: MMPareto (exact) against its floor (``mmpareto[floor]``), measured in the same run.
FLOOR_TARGET = 1.05
#: Methods of the sweeps (joint is the reference).
BALANCING = ("mcr", "ogm", "ogm_ge", "opm", "mmpareto")

NOTES = {
    "unimodal": "first modality only",
    "unipre_frozen": "main stage; adds a unimodal pre-training stage; encoders frozen",
    "unipre_finetuned": "main stage; adds a unimodal pre-training stage",
    "mmpareto[latent]": "method.variant=latent",
    "mmpareto[floor]": "floor of exact MMPareto: its summed-loss step + 1 backward through encoders",
    "mcr[floor]": "floor of MCR: its losses, R_MIPD's gather, set mixing and divergences by "
    "autograd, without the game's routing",
}


class MMParetoFloor(MMPareto):
    """The floor of exact MMPareto: the least any exact per-loss encoder gradient needs.

    The step of MMPareto's model and losses (fused plus unimodal heads) with their summed
    gradient, plus one extra backward pass of the fused loss through the encoders (which
    ``torch.autograd.grad`` computes and this discards). What exact MMPareto adds on top is the
    combination of the two gradients per encoder. Not registered: a benchmark entry only.
    """

    def backward(self, losses: Mapping[str, Tensor], ctx: StepContext) -> None:
        params = [p for ps in ctx.encoder_params.values() for p in ps]
        if params:
            torch.autograd.grad(losses["task"], params, retain_graph=True, allow_unused=True)
        ctx.backward(total_loss(losses))


@dataclass(frozen=True)
class TimedMethod:
    """One timed configuration: a registered method with options, under a label.

    ``method_class`` (optional) replaces the built method by an instance of this class with the
    same options, after the model has been built for ``method`` (the MMPareto floor).
    """

    label: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()
    method_class: type[Method] | None = None


@dataclass
class Setting:
    """A model, data and batch on which methods are compared."""

    name: str
    batch: int
    modalities: int
    entries: list[TimedMethod]
    overrides: dict[str, Any] = field(default_factory=dict)
    #: per-modality input shapes of a random-tensor dataset (None: build the configured dataset)
    shapes: dict[str, tuple[int, ...]] | None = None
    classes: int = 6
    rounds: int = 15
    steps: int = 10
    warmup: int = 3
    mem_steps: int = 3
    #: seconds for the whole setting: rounds are cut so that it fits (at least ``min_rounds``)
    budget_s: float | None = None
    min_rounds: int = 2
    #: targets of this setting, overriding :data:`TARGETS`
    targets: dict[str, float] = field(default_factory=dict)
    #: ``train.compile=true`` for every entry (the compiled step, :mod:`mmbalance.train.compiling`)
    compile: bool = False


class MCRFloor(MCR):
    """The floor of MCR: its losses with R_MIPD's own arithmetic and nothing else.

    The same model, task, unimodal and contrastive losses and the same donors as MCR; R_MIPD is
    the gather of the permuted contributions, the set mixing and the divergences over ``K * B``
    rows per set (``sum_S W_S D_S``), differentiated by autograd without the game's routing of
    the gradient (additive heads, which the benchmark's settings use; other heads: MCR itself).
    What MCR adds on top is the routing. Not registered: a benchmark entry only.
    """

    def mipd(
        self, output: ModelOutput, ctx: StepContext, donors: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        if output.contributions is None or self.params.perturbation != "permute":
            return super().mipd(output, ctx, donors)
        perturbation = self.perturbation(output, ctx, donors)
        assert perturbation.index_stack is not None
        mods = output.modalities
        ref = output.logits
        _, w = self.routing(mods, ref.device, ref.dtype)
        anchors = torch.stack([output.contributions[m] for m in mods])  # (M, B, C)
        m, b, c = anchors.shape
        r = perturbation.rows
        index = perturbation.index_stack.unsqueeze(-1).expand(m, r * b, c)
        moved = anchors.gather(1, index).view(m, r * b * c)
        u = (w.member @ moved).view(-1, r, b, c)
        u = u + (w.outside @ anchors.view(m, b * c)).view(-1, 1, b, c)
        bias = getattr(self._head(ctx), "bias", None)
        if bias is not None:
            u = u + bias
        s = u.shape[0]
        rows = divergence_rows(u.reshape(-1, c), ref.repeat(s * r, 1), ctx.task)
        return (w.shared * rows.view(s, -1).mean(1)).sum()


FLOOR = TimedMethod("mmpareto[floor]", "mmpareto", method_class=MMParetoFloor)
MCR_FLOOR = TimedMethod("mcr[floor]", "mcr", method_class=MCRFloor)
#: the floor entry of a method's label
FLOORS = {"mmpareto": FLOOR, "mcr": MCR_FLOOR}


def all_entries() -> list[TimedMethod]:
    """Every registered method (joint first) plus MMPareto's latent variant and its floor."""
    names = ["joint", *(n for n in METHODS.names() if n != "joint")]
    entries = [TimedMethod(n, n) for n in names]
    if "mmpareto" in names:
        entries += [TimedMethod("mmpareto[latent]", "mmpareto", (("variant", "latent"),)), FLOOR]
    if "mcr" in names:
        entries.append(MCR_FLOOR)
    return entries


def sweep_entries() -> list[TimedMethod]:
    entries = [
        TimedMethod("joint", "joint"),
        *(TimedMethod(n, n) for n in BALANCING if n in METHODS),
    ]
    return entries + [f for name, f in FLOORS.items() if name in METHODS]


def mcr_k_entries(ks: Sequence[int] = (1, 8, 32, 128)) -> list[TimedMethod]:
    """joint and mcr with ``K`` permutations per step, for how its cost scales with K."""
    mcr = [TimedMethod(f"mcr[K={k}]", "mcr", (("num_permutations", k),)) for k in ks]
    floors = [
        TimedMethod(f"mcr[K={k}][floor]", "mcr", (("num_permutations", k),), MCRFloor) for k in ks
    ]
    return [TimedMethod("joint", "joint"), *mcr, *floors]


def _synthetic(modalities: int | None, quick: bool) -> dict[str, Any]:
    """Overrides of the synthetic dataset: ``None`` = the competition preset (small model)."""
    sizes = {"dataset.n_val": 64, "dataset.n_test": 64, "dataset.n_bayes": 256}
    if quick:
        sizes["dataset.n_train"] = 256
    if modalities is None:
        return {"dataset": "synthetic", "dataset.preset": "competition", **sizes}
    m = modalities
    return {
        "dataset": "synthetic",
        "dataset.num_modalities": m,
        "dataset.shares": [0.5] + [0.5 / m] * m,
        "dataset.signal": [3.0] + [1.0] * (m - 1),
        "dataset.depth": [1] + [4] * (m - 1),
        **sizes,
    }


def make_settings(
    quick: bool, device: str, resnet_batch: int | None = None, resnet_budget: float = 480.0
) -> list[Setting]:
    """The settings of a run (``quick``: tiny versions of each, for tests)."""
    cuda = device.startswith("cuda")
    # the CREMA-D train settings (the data are random tensors of its shapes); mcr's K is 32
    resnet_overrides = {"dataset": "cremad", "dataset.frames": 3, "fusion": "late_sum"}
    if quick:
        resnet = Setting(
            "resnet",
            batch=4,
            modalities=2,
            entries=all_entries(),
            overrides={**resnet_overrides, "encoder.audio.width": 4, "encoder.video.width": 4},
            targets={"mcr": 1.05},
            shapes={"audio": (1, 32, 32), "video": (3, 2, 32, 32)},
            rounds=2,
            steps=1,
            warmup=1,
            mem_steps=1,
        )
        small = Setting("small", 32, 2, all_entries(), _synthetic(None, True), rounds=2, steps=2)
        small.warmup, small.mem_steps = 1, 1
        small.targets = {"mcr": 1.5}
        sweeps = [
            Setting("sweep_batch", 16, 2, sweep_entries(), _synthetic(None, True)),
            Setting("sweep_modalities", 32, 3, sweep_entries(), _synthetic(3, True)),
            Setting("sweep_mcr_k", 32, 2, mcr_k_entries((1, 4)), _synthetic(None, True)),
        ]
        for s in sweeps:
            s.rounds, s.steps, s.warmup, s.mem_steps = 2, 2, 1, 1
        return [resnet, small, *sweeps]
    batch = resnet_batch or (32 if cuda else 4)
    resnet = Setting(
        "resnet",
        batch=batch,
        modalities=2,
        entries=all_entries(),
        overrides=resnet_overrides,
        shapes={"audio": (1, 257, 188), "video": (3, 3, 224, 224)},
        rounds=15 if cuda else 10,
        steps=5 if cuda else 1,
        warmup=3 if cuda else 1,
        mem_steps=3 if cuda else 1,
        budget_s=None if cuda else resnet_budget,
        targets={"mcr": 1.05},
    )
    small = Setting(
        "small",
        32,
        2,
        all_entries(),
        _synthetic(None, False),
        rounds=15,
        steps=20,
        targets={"mcr": 1.5},
    )
    batch_targets = {256: {"mcr": 2.0}}
    sweeps = [
        Setting(
            "sweep_batch",
            b,
            2,
            sweep_entries(),
            _synthetic(None, False),
            steps=20,
            targets=batch_targets.get(b, {}),
        )
        for b in (16, 64, 256)
    ]
    modality_targets = {5: {"mcr": 4.0}}
    sweeps += [
        Setting(
            "sweep_modalities",
            32,
            m,
            sweep_entries(),
            _synthetic(m, False),
            steps=20,
            targets=modality_targets.get(m, {}),
        )
        for m in (2, 3, 4, 5)
    ]
    sweeps += [
        Setting("sweep_mcr_k", b, 2, mcr_k_entries(), _synthetic(None, False), steps=10)
        for b in (32, 256)
    ]
    return [resnet, small, *sweeps]


# --- building one method's trainer ----------------------------------------------------------------
_BUNDLES: dict[tuple[Any, ...], DatasetBundle] = {}


def random_bundle(shapes: dict[str, tuple[int, ...]], classes: int, n: int) -> DatasetBundle:
    """Random inputs of the given shapes (ResNet-18 encoders), ``n`` training samples."""
    key = (tuple(sorted(shapes.items())), classes, n)
    if key not in _BUNDLES:
        gen = torch.Generator().manual_seed(0)

        def split(k: int) -> MultimodalTensorDataset:
            x = {m: torch.randn(k, *s, generator=gen) for m, s in shapes.items()}
            return MultimodalTensorDataset(x, torch.randint(0, classes, (k,), generator=gen))

        _BUNDLES[key] = DatasetBundle(
            name="random",
            task="classification",
            num_outputs=classes,
            modalities={m: ModalitySpec(m, s, "resnet18", {}) for m, s in shapes.items()},
            splits={"train": split(n), "val": split(2), "test": split(2)},
        )
    return _BUNDLES[key]


def build_run(
    setting: Setting, entry: TimedMethod, device: str, workdir: Path
) -> tuple[Trainer, Batch]:
    """A trainer for ``entry`` on ``setting`` (built as ``fit`` builds it) and the fixed batch."""
    accelerator = "cuda" if device.startswith("cuda") else "cpu"
    shared = dict(setting.overrides)
    if METHODS.get(entry.method).fusion is not None:  # a method defined on its own head keeps it
        shared = {k: v for k, v in shared.items() if k != "fusion" and not k.startswith("fusion.")}
    overrides = {
        **shared,
        "method": entry.method,
        **{f"method.{k}": v for k, v in entry.params},
        "train.batch_size": setting.batch,
        "train.accelerator": accelerator,
        "train.progress": False,
        "train.tensorboard": False,
        "train.compile": setting.compile,
    }
    cfg = resolve_config(overrides)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=cfg.train.precision)
    fabric.seed_everything(cfg.train.seed, verbose=False)  # the same weights for every method
    if setting.shapes is not None:
        # enough samples for a method that holds out a stratified part of the training split
        # (G-Blending 10 %, LFM 2 %); the timed batch is the first ``batch`` of them
        data = random_bundle(
            setting.shapes, setting.classes, max(setting.batch, 60 * setting.classes)
        )
    else:
        data = build_dataset(cfg)
    method, model, method_module = build_components(cfg, data)
    if entry.method_class is not None:
        assert method.info is not None
        replaced = entry.method_class(method.params)
        method_module = replaced.setup(method.info)
        method = replaced
    if method.freezes_encoders:  # as after the pre-training stage in ``fit``
        model.encoders.requires_grad_(False)
    trainer = Trainer(fabric, cfg, data, model, method, method_module, workdir)
    trainer.train_mode()
    method.on_epoch_start(trainer.epoch_context(EPOCH))
    batch = data.splits["train"].__getitems__(list(range(setting.batch)))
    return trainer, batch.to(fabric.device)


def _log(message: str) -> None:
    print(message, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- timing --------------------------------------------------------------------------------------
#: ``wall``: elapsed time (what a user waits for); ``thread``: CPU time of the timing thread
#: (``time.thread_time``), which does not count waiting for a core on a shared machine; with
#: ``--threads 1`` it is the whole compute of the step (with more threads it misses the
#: intra-op workers' share), so it measures cost robustly under load.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def time_setting(
    setting: Setting,
    device: str,
    log: Callable[[str], None] = _log,
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
            trainer, batch = runs[label]
            _sync(device)
            t0 = now()
            for _ in range(steps):
                trainer.train_step(batch, EPOCH)
            _sync(device)
            return (now() - t0) / steps

        data = next(iter(runs.values()))[0].data
        shapes = {m: list(spec.shape) for m, spec in data.modalities.items()}
        if setting.compile:  # compiling happens here, outside the rounds and the budget
            for label in runs:
                timed(label, setting.warmup)
                compile_s[label] = runs[label][0].compiler.seconds or 0.0
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


# --- memory --------------------------------------------------------------------------------------
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
        trainer, batch = build_run(setting, entry, device, Path(tmp))
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current
            base = 1024 * _status_kb("VmRSS")
        for _ in range(setting.mem_steps):
            trainer.train_step(batch, EPOCH)
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


# --- records and tables ----------------------------------------------------------------------------
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
    floor_of = {f.label: f.label for f in setting.entries if f.method_class is not None}
    for e in setting.entries:
        if e.method_class is None:
            floor = FLOORS.get(e.label)
            labels = {f.label for f in setting.entries}
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
    log: Callable[[str], None] = _log,
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
        (out_dir / f"{stem}.json").write_text(json.dumps(records, indent=2) + "\n")
        (out_dir / f"{stem}.md").write_text(cost_markdown(records))
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


def print_table(records: Sequence[dict[str, Any]]) -> None:
    print(cost_text(records))


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
    print_table(records)
    stem = args.stem or results_stem(args.device) + ("_compiled" if args.compile else "")
    print(
        f"wrote {Path(args.out_dir) / stem}.json and .md in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    # run as the importable module so that the memory processes can unpickle its functions
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_cost

    bench_cost.main()
