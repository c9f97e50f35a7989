"""Step time of ``ogm``, ``ogm_ge`` and ``opm`` relative to ``joint`` on the same model and batch.

A step is what the trainer does: forward through the hooks, backward, gradient rewrite,
optimizer step. Methods are timed interleaved in rounds (each round times every method once over
``--steps`` steps), and the median over rounds is reported, so background load hits all methods
alike. Prints a table and writes JSON (``--out``).

    PYTHONPATH=. python benchmarks/bench_ogm.py --rounds 15 --out benchmarks/results/bench_ogm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mmbalance.methods import StepContext, build_method
from mmbalance.models.encoders import MLPEncoder, ResNet18Encoder
from mmbalance.models.fusion import build_fusion
from mmbalance.models.multimodal import MultimodalModel

TIMED_METHOD_OPTIONS = {
    "joint": {},
    "ogm": {"alpha": 0.8},
    "ogm_ge": {"alpha": 0.8},
    "opm": {"warmup_epochs": 0, "p_exe": 1.0},
}


def make_setup(kind: str, fusion: str, batch: int) -> tuple[MultimodalModel, dict, torch.Tensor]:
    """A model and one fixed batch: ``mlp`` (synthetic-sized) or ``conv`` (small ResNet-18s)."""
    torch.manual_seed(0)
    if kind == "mlp":
        shapes = {"m1": (64,), "m2": (64,)}
        encoders = {m: MLPEncoder(s, hidden=(256, 256), out_dim=128) for m, s in shapes.items()}
    else:
        shapes = {"audio": (1, 32, 32), "visual": (3, 32, 32)}
        encoders = {m: ResNet18Encoder(s, width=16, small_input=True) for m, s in shapes.items()}
    dims = {m: int(e.out_dim) for m, e in encoders.items()}
    model = MultimodalModel(encoders, build_fusion(fusion, dims, 10, {}))
    inputs = {m: torch.randn(batch, *s) for m, s in shapes.items()}
    return model, inputs, torch.randint(0, 10, (batch,))


def time_steps(model: nn.Module, method, inputs, y, opt, steps: int) -> float:
    """Seconds per training step of ``method`` (hooks as the trainer calls them)."""
    start = time.perf_counter()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        ctx = StepContext.standalone(
            y, fusion=model.fusion, encoder_params=model.encoder_parameters(), step=step
        )
        latents = method.transform_latents(model.encode(inputs), ctx)
        losses = method.losses(model.heads(latents), ctx)
        method.backward(losses, ctx)
        method.rewrite_gradients(ctx)
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--setups", default="mlp:late_sum,mlp:concat_mlp,conv:concat_linear")
    parser.add_argument("--out", default="benchmarks/results/bench_ogm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for setup in args.setups.split(","):
        kind, fusion = setup.split(":")
        model, inputs, y = make_setup(kind, fusion, args.batch)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        methods = {n: build_method(n, p) for n, p in TIMED_METHOD_OPTIONS.items()}
        for m in methods.values():  # warm-up
            time_steps(model, m, inputs, y, opt, 2)
        times: dict[str, list[float]] = {n: [] for n in methods}
        for _ in range(args.rounds):
            for n, m in methods.items():
                times[n].append(time_steps(model, m, inputs, y, opt, args.steps))
        joint = statistics.median(times["joint"])
        for n in methods:
            med = statistics.median(times[n])
            results.append(
                {"setup": setup, "method": n, "median_ms": 1e3 * med, "ratio_to_joint": med / joint}
            )
    print(f"{'setup':<22}{'method':<8}{'median ms/step':>16}{'ratio':>8}")
    for r in results:
        print(f"{r['setup']:<22}{r['method']:<8}{r['median_ms']:>16.3f}{r['ratio_to_joint']:>8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "rounds": args.rounds,
        "steps": args.steps,
        "batch": args.batch,
        "threads": args.threads,
    }
    out.write_text(json.dumps({"config": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
