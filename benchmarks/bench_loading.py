"""Loading throughput against the training step, for AV-Fashion (or any registered dataset).

Prepared datasets live in memory (loaded memory-mapped from the cache), and batches are gathered
whole by ``MultimodalTensorDataset.__getitems__``, so loading should be far faster than training.
This script measures both on the same batches and prints samples per second:

    PYTHONPATH=. python benchmarks/bench_loading.py --dataset av-fashion --batches 50

``loading`` iterates the training DataLoader only; ``train step`` adds forward, cross-entropy,
backward and an Adam step of the dataset's default model (joint training).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from mmbalance.build import build_dataset, build_method, build_model, resolve_config
from mmbalance.train.data import EpochBatchSampler, make_loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="av-fashion")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    cfg = resolve_config({"dataset": args.dataset, "method": "joint"})
    t0 = time.perf_counter()
    data = build_dataset(cfg)
    print(f"dataset ready (build or cache load): {time.perf_counter() - t0:.2f} s")
    train = data.splits["train"]
    sampler = EpochBatchSampler(len(train), args.batch_size, seed=0)
    loader = make_loader(train, sampler, args.workers)

    def batches():
        while True:
            yield from loader

    it = batches()
    next(it)
    n = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        n += len(next(it))
    load_rate = n / (time.perf_counter() - t0)

    model = build_model(cfg, data, build_method(cfg))
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


if __name__ == "__main__":
    main()
