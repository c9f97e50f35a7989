"""Linear probes on frozen latents: how much each encoder itself learned, whatever the method.

A method can leave a modality's encoder fine while the fusion head ignores it, or starve the
encoder itself; the unimodal heads cannot tell these apart, a probe trained afresh on the frozen
features can.

Three probes:

* :func:`probe_predictions` (end of run): fitted on the training split's latents and scored on
  another split; a logistic regression for classification, a ridge regression for regression.
* :func:`stacked_probe_accuracy`: one probe on every encoder's latents together (what a linear
  fusion of them can reach).
* :func:`split_half_probe_accuracy` (every epoch, cheap): a closed-form ridge regression onto the
  one-hot targets (or onto the regression target) fitted on a fixed random half of the validation
  latents and scored on the other half. It needs no second encoder pass and costs one ``d x d``
  solve per modality, so it can run after every epoch; it is a cheaper, noisier and usually lower
  estimate than the end-of-run probe (half the samples, least squares instead of a logistic
  loss), meant for the *trend* of each encoder over epochs and for comparing methods on the same
  data, not as a final number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.data.base import Batch
from mmbalance.eval.outcome import OUTCOMES
from mmbalance.models.multimodal import MultimodalModel


@torch.no_grad()
def latents_of(
    model: MultimodalModel,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | None = None,
    encode: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Pooled latents of every sample of ``dataset`` (eval mode) and the targets; ``encode``
    replaces ``model.encode`` (a method's evaluation encoding)."""
    encode = encode or model.encode
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {}
    targets = []
    for start in range(0, len(dataset), batch_size):
        batch: Batch = dataset.__getitems__(range(start, min(start + batch_size, len(dataset))))
        batch = batch.to(device)
        for m, z in encode(batch.inputs).items():
            parts.setdefault(m, []).append(z.float().cpu())
        targets.append(batch.targets.cpu())
    model.train(was_training)
    return {m: torch.cat(v) for m, v in parts.items()}, torch.cat(targets)


def probe_predictions(
    z_train: dict[str, Tensor],
    y_train: Tensor,
    z_eval: dict[str, Tensor],
    max_iter: int = 500,
    task: str = "classification",
) -> dict[str, Tensor]:
    """Predictions on ``z_eval`` of a probe per modality fitted on ``(z_train, y_train)``
    (standardised features): class indices of a logistic regression for classification, values
    of a ridge regression (``alpha=1``) for regression.

    scikit-learn's BLAS runs on as many threads as torch (``torch.get_num_threads()``), not on
    every core: parallel training processes of one torch thread each would otherwise
    oversubscribe the machine during their probes."""
    out = {}
    with threadpool_limits(limits=torch.get_num_threads()):
        for m in z_train:
            out[m] = _probe_one(z_train[m], y_train, z_eval[m], max_iter, task)
    return out


def _probe_one(
    z_train: Tensor, y_train: Tensor, z_eval: Tensor, max_iter: int, task: str
) -> Tensor:
    scaler = StandardScaler().fit(z_train.numpy())
    if task == "classification":
        probe: LogisticRegression | Ridge = LogisticRegression(max_iter=max_iter)
    else:
        probe = Ridge(alpha=1.0)
    probe.fit(scaler.transform(z_train.numpy()), y_train.numpy())
    return torch.as_tensor(probe.predict(scaler.transform(z_eval.numpy())))


def probe_accuracy(
    model: MultimodalModel,
    train: Dataset,
    evaluate: Dataset,
    max_iter: int = 500,
    task: str = "classification",
) -> dict[str, float]:
    """Accuracy on ``evaluate`` (:mod:`~mmbalance.eval.outcome`: the binary accuracy of the
    sign for regression) of a probe per modality fitted on ``train``."""
    z_train, y_train = latents_of(model, train)
    z_eval, y_eval = latents_of(model, evaluate)
    preds = probe_predictions(z_train, y_train, z_eval, max_iter, task)
    outcome = OUTCOMES.get(task)
    return {m: outcome.accuracy(p, y_eval) for m, p in preds.items()}


def stacked_probe_accuracy(
    z_train: Mapping[str, Tensor],
    y_train: Tensor,
    z_eval: Mapping[str, Tensor],
    y_eval: Tensor,
    max_iter: int = 500,
    task: str = "classification",
) -> float:
    """Accuracy on ``(z_eval, y_eval)`` of one probe on every modality's latents concatenated
    (fitted on ``z_train``): what a linear fusion of these encoders can reach. On the encoders of
    independently trained unimodal models it estimates the fused accuracy that competition-free
    training could aim for (the regime criteria's *stacked probe*)."""
    order = list(z_train)
    both_train = torch.cat([z_train[m].reshape(len(y_train), -1) for m in order], 1)
    both_eval = torch.cat([z_eval[m].reshape(len(y_eval), -1) for m in order], 1)
    pred = probe_predictions({"all": both_train}, y_train, {"all": both_eval}, max_iter, task)
    return OUTCOMES.get(task).accuracy(pred["all"], y_eval)


def split_half_probe_accuracy(
    z: Tensor, targets: Tensor, task: str, num_outputs: int, alpha: float = 0.1, seed: int = 0
) -> float:
    """Accuracy of a closed-form ridge probe fitted on one fixed half of ``(z, targets)`` and
    scored on the other half (see the module docstring).

    Features are standardised with the fitting half's statistics; the penalty is
    ``alpha * n_fit`` on the standardised weights (intercept not penalised); ``alpha=0.1`` was
    the best of 0.01, 0.1, 1 and 10 on AV-Digits validation latents and is not tuned per
    dataset. The halves come from a permutation seeded by ``seed``, so they are the same at
    every epoch.
    """
    n = z.shape[0]
    if n < 4:
        return float("nan")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = perm[: n // 2], perm[n // 2 :]
    x = z.detach().reshape(n, -1).double().cpu()
    y = targets.detach().cpu()
    mean, std = x[fit].mean(0), x[fit].std(0).clamp_min(1e-8)
    x = (x - mean) / std
    if task == "classification":
        t = torch.nn.functional.one_hot(y.long(), num_outputs).double()
    else:
        t = y.double().reshape(n, 1)
    t_mean = t[fit].mean(0)
    gram = x[fit].T @ x[fit] + alpha * len(fit) * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, x[fit].T @ (t[fit] - t_mean))
    pred = x[held] @ w + t_mean
    return OUTCOMES.get(task).accuracy(pred, y[held])
