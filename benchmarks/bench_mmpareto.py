"""Step time of MMPareto relative to joint training, on the same model and batch.

Variants, timed interleaved (round-robin) so that machine noise hits all of them alike:

- ``joint``: one backward of the fused loss;
- ``official``: MMPareto as the official code runs it, ``M + 2`` backward passes (one per loss,
  one for the sum), then the same rule;
- ``exact``: our ``mmpareto`` (two passes whatever ``M``);
- ``latent``: our ``mmpareto`` with ``variant=latent`` (one pass through the encoders).

Each step is forward + losses + backward + SGD step. Prints a table and writes
``benchmarks/results/bench_mmpareto.json``. Usage: ``python benchmarks/bench_mmpareto.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mmbalance.builder import build_components, build_dataset, resolve_config
from mmbalance.methods import build_method
from mmbalance.methods.base import StepContext, unimodal_losses
from mmbalance.methods.mmpareto import combine_encoder_gradients


def _official_backward(model: nn.Module, losses: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """One backward pass per loss (``zero_grad`` between), then one for the sum."""
    enc = ctx.encoder_params
    per_loss = {}
    for name, loss in losses.items():
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        per_loss[name] = {
            m: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ps]
            for m, ps in enc.items()
        }
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    for m, ps in enc.items():
        new, _ = combine_encoder_gradients(per_loss["task"][m], per_loss[f"uni_{m}"][m], 1.5)
        for p, g in zip(ps, new, strict=True):
            p.grad = g


def run(num_modalities: int, repeats: int = 15, batch: int = 64) -> dict[str, float]:
    torch.manual_seed(0)
    overrides = {
        "dataset.num_modalities": num_modalities,
        "dataset.n_train": 256,
        "dataset.n_val": 16,
        "dataset.n_test": 16,
        "dataset.n_bayes": 16,
        "fusion": "late_sum",
    }
    if num_modalities > 3:
        overrides |= {
            "dataset.shares": [0.2] + [0.8 / num_modalities] * num_modalities,
            "dataset.signal": [3.0] + [1.0] * (num_modalities - 1),
            "dataset.depth": [1] + [4] * (num_modalities - 1),
        }
    cfg = resolve_config({"method": "mmpareto", **overrides})
    data = build_dataset(cfg)
    _, model, _ = build_components(cfg, data)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    train = data.splits["train"]
    b = train.__getitems__(list(range(batch)))
    x, y = b.inputs, b.targets
    exact = build_method("mmpareto", {})
    latent = build_method("mmpareto", {"variant": "latent"})

    def step(kind: str) -> None:
        opt.zero_grad(set_to_none=True)
        ctx = StepContext.standalone(y, encoder_params=model.encoder_parameters())
        out = model(x)
        if kind == "joint":
            ctx.task_loss(out.logits).backward()
        elif kind == "official":
            losses = {"task": ctx.task_loss(out.logits)} | unimodal_losses(out, ctx, 1.0)
            _official_backward(model, losses, ctx)
        else:
            method = exact if kind == "exact" else latent
            method.backward(method.losses(out, ctx), ctx)
        opt.step()

    kinds = ["joint", "official", "exact", "latent"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for k in kinds:  # warm-up
        for _ in range(3):
            step(k)
    for _ in range(repeats):
        for k in kinds:
            t0 = time.perf_counter()
            for _ in range(5):
                step(k)
            times[k].append((time.perf_counter() - t0) / 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "M": num_modalities,
        **{f"{k}_ms": 1e3 * v for k, v in med.items()},
        **{f"{k}_ratio": v / med["joint"] for k, v in med.items()},
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = [run(m) for m in (2, 3, 4)]
    print(f"{'M':>2} {'joint ms':>9} {'official':>9} {'exact':>9} {'latent':>9}  (ratios to joint)")
    for r in rows:
        print(
            f"{r['M']:>2} {r['joint_ms']:>9.2f} {r['official_ratio']:>9.2f} "
            f"{r['exact_ratio']:>9.2f} {r['latent_ratio']:>9.2f}"
        )
    out = Path(__file__).parent / "results" / "bench_mmpareto.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
