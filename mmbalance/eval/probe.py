"""Linear probes on frozen latents: how much each encoder itself learned, whatever the method.

A method can leave a modality's encoder fine while the fusion head ignores it, or starve the
encoder itself; the unimodal heads cannot tell these apart, a probe trained afresh on the frozen
features can.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.data.base import Batch
from mmbalance.models.multimodal import MultimodalModel


@torch.no_grad()
def latents_of(
    model: MultimodalModel, dataset: Dataset, batch_size: int = 256, device: str | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Pooled latents of every sample of ``dataset`` (eval mode) and the targets."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {}
    targets = []
    for start in range(0, len(dataset), batch_size):
        batch: Batch = dataset.__getitems__(range(start, min(start + batch_size, len(dataset))))
        batch = batch.to(device)
        for m, z in model.encode(batch.inputs).items():
            parts.setdefault(m, []).append(z.float().cpu())
        targets.append(batch.targets.cpu())
    model.train(was_training)
    return {m: torch.cat(v) for m, v in parts.items()}, torch.cat(targets)


def probe_predictions(
    z_train: dict[str, Tensor], y_train: Tensor, z_eval: dict[str, Tensor], max_iter: int = 500
) -> dict[str, Tensor]:
    """Class predictions on ``z_eval`` of a logistic-regression probe per modality fitted on
    ``(z_train, y_train)`` (standardised features)."""
    out = {}
    for m in z_train:
        scaler = StandardScaler().fit(z_train[m].numpy())
        clf = LogisticRegression(max_iter=max_iter)
        clf.fit(scaler.transform(z_train[m].numpy()), y_train.numpy())
        out[m] = torch.as_tensor(clf.predict(scaler.transform(z_eval[m].numpy())))
    return out


def probe_accuracy(
    model: MultimodalModel, train: Dataset, evaluate: Dataset, max_iter: int = 500
) -> dict[str, float]:
    """Accuracy on ``evaluate`` of a logistic-regression probe per modality fitted on ``train``."""
    z_train, y_train = latents_of(model, train)
    z_eval, y_eval = latents_of(model, evaluate)
    preds = probe_predictions(z_train, y_train, z_eval, max_iter)
    return {m: float(np.mean(p.numpy() == y_eval.numpy())) for m, p in preds.items()}
