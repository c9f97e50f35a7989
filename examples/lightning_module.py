"""A balancing method in a Lightning project: :class:`mmbalance.lightning.BalancedModule`.

Your encoders, a fusion head and (for the methods that need them) unimodal heads become one
``LightningModule``; ``lightning.Trainer`` trains it with the method's whole step (its forward,
losses, backward, gradient rewrite; MLA's one optimizer step per modality), its epoch hooks and
its scalars in Lightning's logs. Checkpoints hold the method's state as plain values and load
with ``weights_only=True``.

Run: ``python examples/lightning_module.py [METHOD ...]`` (default: ogm_ge, mcr, mla).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from mmbalance.lightning import BalancedModule
from mmbalance.models import build_fusion

CLASSES = 4
OPTIONS: dict[str, dict[str, object]] = {
    "ogm_ge": {"alpha": 0.8},
    "mcr": {"lam_ceb": 0.1},
    "mla": {},
}


def toy_data(n: int, seed: int) -> TensorDataset:
    """A strong audio modality and a weak video one (class means in noise, fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(2, CLASSES, 12, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(CLASSES, (n,), generator=gen)
    audio = 1.2 * means[0, y] + torch.randn(n, 12, generator=gen)
    video = 0.6 * means[1, y, :8] + torch.randn(n, 8, generator=gen)
    return TensorDataset(audio, video, y)


def as_pairs(rows: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
    """A batch as BalancedModule takes it: ``(inputs by modality, targets)``."""
    audio, video, y = (torch.stack(column) for column in zip(*rows, strict=True))
    return {"audio": audio, "video": video}, y


def train(
    method: str, epochs: int = 4, out: Path | None = None, seed: int = 0
) -> dict[str, object]:
    """Train with ``method`` under lightning.Trainer; returns the validation accuracy, the
    logged metrics' names and the last checkpoint's path (with ``out``)."""
    pl.seed_everything(seed, verbose=False)
    encoders = {
        "audio": nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16)),
        "video": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16)),
    }
    module = BalancedModule(
        method,
        encoders,
        build_fusion("concat_linear", {"audio": 16, "video": 16}, CLASSES, {}),
        unimodal_heads={m: nn.Linear(16, CLASSES) for m in encoders},  # mcr trains them
        options=OPTIONS.get(method, {}),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    load = functools.partial(DataLoader, batch_size=64, collate_fn=as_pairs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=out is not None,
        default_root_dir=out,
    )
    trainer.fit(module, load(toy_data(640, seed), shuffle=True), load(toy_data(320, seed + 1)))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    last = trainer.checkpoint_callback.best_model_path if out is not None else None
    return {"val_accuracy": metrics["val_accuracy"], "logged": sorted(metrics), "checkpoint": last}


def main(methods: list[str]) -> None:
    for method in methods or list(OPTIONS):
        result = train(method)
        print(f"{method}: validation accuracy {result['val_accuracy']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
