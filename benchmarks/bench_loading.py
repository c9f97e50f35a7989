"""Loading throughput against the training step, for AV-Fashion (or any registered dataset).

Prepared datasets live in memory (loaded memory-mapped from the cache), and batches are gathered
whole by ``MultimodalTensorDataset.__getitems__``, so loading should be far faster than training.
This script measures both on the same batches and prints samples per second:

    PYTHONPATH=. python benchmarks/bench_loading.py --dataset av-fashion --batches 50 \
        --out benchmarks/results/bench_loading_av_fashion.json

``loading`` iterates the training DataLoader only; ``train step`` adds forward, cross-entropy,
backward and an Adam step of the dataset's default model (joint training).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from mmbalance.builder import build_components, build_dataset, resolve_config
from mmbalance.train.batching import EpochBatchSampler, make_loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="av-fashion")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    args = ap.parse_args()

    cfg = resolve_config({"dataset": args.dataset, "method": "joint"})
    t0 = time.perf_counter()
    data = build_dataset(cfg)
    ready_s = time.perf_counter() - t0
    print(f"dataset ready (build or cache load): {ready_s:.2f} s")
    train = data.splits["train"]
    sampler = EpochBatchSampler(len(train), args.batch_size, seed=0)
    loader = make_loader(train, sampler, args.workers)

    def batches():
        while True:
            yield from loader

    it = batches()
    # one full pass first: the cached arrays are memory-mapped, so the first touch of every page
    # is a disk read that a long training run pays once, not per epoch
    for _ in range(len(loader)):
        next(it)
    n = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        n += len(next(it))
    load_rate = n / (time.perf_counter() - t0)

    _, model, _ = build_components(cfg, data)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = nn.CrossEntropyLoss()
    n = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        b = next(it)
        opt.zero_grad()
        loss_fn(model(b.inputs).logits, b.targets).backward()
        opt.step()
        n += len(b)
    step_rate = n / (time.perf_counter() - t0)
    print(f"loading only:           {load_rate:12,.0f} samples/s")
    print(f"loading + train step:   {step_rate:12,.0f} samples/s")
    print(f"loading share of a step: {100 * step_rate / load_rate:.1f} %")
    if args.out:
        result = {
            "dataset": args.dataset,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "workers": args.workers,
            "dataset_ready_s": round(ready_s, 3),
            "loading_samples_per_s": round(load_rate, 1),
            "train_step_samples_per_s": round(step_rate, 1),
            "loading_share_of_step_pct": round(100 * step_rate / load_rate, 2),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
