"""Step time of ``mcr`` relative to ``joint`` on the same model and batch.

One training step = encoders, heads, the method's losses, backward and an SGD step. For each
setting the two methods are timed in interleaved repetitions (joint, mcr, joint, mcr, ...) so
that load from other processes hits both alike, and the ratio of the medians is reported.

Settings (default run, a few minutes on 2 CPU cores):

- small: MLP encoders (64 -> 128 -> 64), batch 32, sweeps over K, batch size, M and fusion head
  (late_sum, concat_linear, concat_mlp, film, gated, transformer);
- resnet: two ResNet-18 encoders (the audio-visual model), batch 32, late_sum, K = 32.
  ``--full`` uses the full input size (1x257x188 spectrogram + 3x3x224x224 frames); the default
  uses a reduced size (1x128x94 + 3x1x112x112) so that the repetitions fit in the time budget.

The small-model sweeps also time MCR's two evaluations of R_MIPD (``evaluation=per_set``, the
default, against the reference code's ``per_mask``) and MCR without its contrastive and
unimodal terms (``mipd only``), which splits the cost between the regulariser and the rest.

Peak memory is the process's maximum resident set size after each setting (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). ``--clock thread`` times with the CPU time of the
timing thread (robust on a shared machine; use it with ``torch`` on one thread, the default
here). Results go to ``benchmarks/results/bench_mcr.json``.

Run: ``PYTHONPATH=. python benchmarks/bench_mcr.py [--full] [--reps N] [--device cuda]
[--clock thread] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.methods import METHODS, ModelInfo, StepContext
from mmbalance.models import MultimodalModel, build_fusion
from mmbalance.models.encoders import ResNet18Encoder

RESULTS = Path(__file__).resolve().parent / "results"


def mlp_model(m: int, fusion: str, classes: int = 6) -> tuple[MultimodalModel, dict[str, Any]]:
    enc = {
        f"m{i + 1}": nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        for i in range(m)
    }
    head = build_fusion(fusion, {k: 64 for k in enc}, classes, {})
    return MultimodalModel(enc, head, unimodal_heads=True), {k: (64,) for k in enc}


def resnet_model(full: bool, classes: int = 6) -> tuple[MultimodalModel, dict[str, Any]]:
    audio = (1, 257, 188) if full else (1, 128, 94)
    video = (3, 3, 224, 224) if full else (3, 1, 112, 112)
    enc = {"audio": ResNet18Encoder(audio), "video": ResNet18Encoder(video)}
    head = build_fusion("late_sum", {"audio": 512, "video": 512}, classes, {})
    return MultimodalModel(enc, head, unimodal_heads=True), {"audio": audio, "video": video}


def make_step(
    model: MultimodalModel,
    method_name: str,
    params: dict[str, Any],
    x: dict[str, Tensor],
    y: Tensor,
) -> Any:
    method = METHODS.get(method_name)(**params)
    extra = method.setup(
        ModelInfo(model.modalities, dict(model.fusion.latent_dims), model.fusion.num_outputs)
    )
    modules = [model] + ([extra] if extra is not None else [])
    opt = torch.optim.SGD([p for mod in modules for p in mod.parameters()], lr=1e-3)

    def step() -> None:
        ctx = StepContext.standalone(y, fusion=model.fusion, encode=model.encode, inputs=x)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        losses = method.losses(out, ctx)
        method.backward(losses, ctx)
        opt.step()

    return step


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def compare(
    name: str,
    build: Any,
    batch: int,
    mcr_params: dict[str, Any],
    reps: int,
    device: str,
    clock: str = "wall",
) -> dict[str, Any]:
    torch.manual_seed(0)
    model, shapes = build()
    model.to(device).train()
    x = {m: torch.randn(batch, *s, device=device) for m, s in shapes.items()}
    y = torch.randint(0, model.fusion.num_outputs, (batch,), device=device)
    steps = {
        "joint": make_step(model, "joint", {}, x, y),
        "mcr": make_step(model, "mcr", mcr_params, x, y),
    }
    times: dict[str, list[float]] = {"joint": [], "mcr": []}
    for key in ("joint", "mcr"):  # warm-up
        steps[key]()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    now = CLOCKS[clock]
    for _ in range(reps):
        for key in ("joint", "mcr"):
            sync(device)
            t0 = now()
            steps[key]()
            sync(device)
            times[key].append(now() - t0)
    joint, mcr = statistics.median(times["joint"]), statistics.median(times["mcr"])
    row = {
        "setting": name,
        "batch": batch,
        **{
            k: v
            for k, v in mcr_params.items()
            if k in ("num_permutations", "lam_con", "lam_uni", "evaluation", "subsets")
        },
        "clock": clock,
        "joint_ms": 1000 * joint,
        "mcr_ms": 1000 * mcr,
        "ratio": mcr / joint,
        "peak_mb": peak_memory_mb(device),
    }
    print(
        f"{name:<38} B={batch:<4} joint {row['joint_ms']:8.2f} ms  mcr {row['mcr_ms']:8.2f} ms  "
        f"ratio {row['ratio']:.3f}  peak {row['peak_mb']:.0f} MB",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size ResNet-18 AV inputs")
    ap.add_argument("--reps", type=int, default=15, help="repetitions of the small-model sweeps")
    ap.add_argument("--resnet-reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "bench_mcr.json"))
    args = ap.parse_args()
    dev, reps, clock = args.device, args.reps, args.clock
    torch.set_num_threads(args.threads)
    mcr = {"lam": 0.1, "strategy": "greedy", "num_permutations": 32, "lam_con": 1.0}
    mipd_only = {**mcr, "lam_con": 0.0, "lam_uni": 0.0}
    rows: list[dict[str, Any]] = []
    print(f"device {dev}; torch threads {torch.get_num_threads()}; clock {clock}")

    def run(name: str, build: Any, batch: int, params: dict[str, Any], n: int) -> None:
        rows.append(compare(name, build, batch, params, n, dev, clock))

    if not args.skip_resnet:
        for label, params in (("", mcr), (" MIPD only (lam_con=0, lam_uni=0)", mipd_only)):
            run(
                f"resnet18 AV ({'full' if args.full else 'reduced'}) late_sum K=32{label}",
                lambda: resnet_model(args.full),
                32,
                params,
                args.resnet_reps,
            )
    for evaluation in ("per_set", "per_mask"):
        for m in (2, 4):
            run(
                f"small M={m} late_sum K=32 mipd only {evaluation}",
                lambda m=m: mlp_model(m, "late_sum"),
                32,
                {**mipd_only, "evaluation": evaluation},
                reps,
            )
        run(
            f"small M=2 concat_mlp K=32 mipd only {evaluation}",
            lambda: mlp_model(2, "concat_mlp"),
            32,
            {**mipd_only, "evaluation": evaluation},
            reps,
        )
    for k in (1, 8, 32, 128):
        run(
            f"small M=2 late_sum K={k}",
            lambda: mlp_model(2, "late_sum"),
            32,
            {**mcr, "num_permutations": k},
            reps,
        )
    for b in (8, 128, 512):
        run("small M=2 late_sum K=32", lambda: mlp_model(2, "late_sum"), b, mcr, reps)
    for m in (3, 4, 5):
        for which in ("all", "linear"):
            run(
                f"small M={m} late_sum K=32 subsets={which}",
                lambda m=m: mlp_model(m, "late_sum"),
                32,
                {**mcr, "subsets": which},
                reps,
            )
    for fusion in ("concat_linear", "concat_mlp", "film", "gated", "transformer"):
        run(f"small M=2 {fusion} K=32", lambda fusion=fusion: mlp_model(2, fusion), 32, mcr, reps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": dev, "threads": torch.get_num_threads(), "clock": clock}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
