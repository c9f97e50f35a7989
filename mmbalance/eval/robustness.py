"""Robustness to a missing or corrupted modality at test time.

For every modality ``m`` and every rate ``r`` of :data:`RATES` (20 %, 50 % and 100 % of the test
samples), the accuracy of the method's prediction (the task's accuracy of
:mod:`mmbalance.eval.correctness`: classes, or the sign for regression) when ``m`` is

* ``missing``: absent from those samples, following the method's own convention
  (:meth:`~mmbalance.methods.Method.predict_missing`; by default its latent is zero before the
  heads, which is what a concatenation or sum head sees of a modality it does not get);
* ``noisy``: replaced in those samples by Gaussian noise with the modality's own mean and
  standard deviation (two scalars over every element of that modality's test inputs), then
  encoded as usual. Modalities whose inputs are not floating point get no ``noisy`` metric.

Which samples lose a modality and the noise they get are fixed by the test split alone, never
by the method or the run: the samples of rate ``r`` are the first ``round(r * N)`` of a random
order of the test split drawn from :data:`ROBUSTNESS_SEED` and the modality's position (so the
20 % are among the 50 %), and sample ``i``'s noise is drawn from its own generator seeded by the
same seed, the modality's position and ``i``. Every method, seed and batch size therefore sees
exactly the same corrupted samples.

The metric keys (test split): ``missing_<m>_<pct>`` and ``noisy_<m>_<pct>`` (``pct`` = 20, 50,
100), and ``robust_<pct>``, the lowest ``missing_<m>_<pct>`` over the modalities: the accuracy
left when the modality the model depends on most is absent from that share of the samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.data.base import Batch
from mmbalance.eval.correctness import OUTCOMES
from mmbalance.models.output import ModelOutput

#: Shares of the test samples from which a modality is removed or replaced by noise.
RATES: tuple[float, ...] = (0.2, 0.5, 1.0)
#: Fixes which samples are corrupted and their noise (the same for every method and run).
ROBUSTNESS_SEED = 4_051_979
#: The two corruptions, as the prefixes of their metric keys.
KINDS = ("missing", "noisy")

Encode = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
Heads = Callable[[Mapping[str, Tensor]], ModelOutput]
PredictMissing = Callable[[Heads, Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


def rate_key(kind: str, modality: str, rate: float) -> str:
    """``missing_audio_50``: the metric of ``kind`` for ``modality`` at ``rate``."""
    return f"{kind}_{modality}_{round(rate * 100)}"


def summary_key(rate: float) -> str:
    """``robust_50``: the lowest ``missing_<m>_50`` over the modalities."""
    return f"robust_{round(rate * 100)}"


def corruption_order(n: int, position: int) -> Tensor:
    """The order in which the test samples lose the modality at ``position``: at rate ``r``
    the first ``round(r * n)`` of it."""
    gen = torch.Generator().manual_seed(ROBUSTNESS_SEED + position)
    return torch.randperm(n, generator=gen)


def corrupted_mask(n: int, position: int, rate: float) -> Tensor:
    """Boolean ``(n,)``: the test samples that lose the modality at ``position`` at ``rate``."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[corruption_order(n, position)[: round(rate * n)]] = True
    return mask


def sample_noise(
    index: Tensor, shape: Sequence[int], position: int, mean: float, std: float
) -> Tensor:
    """Gaussian noise ``(len(index), *shape)`` with ``mean`` and ``std``, each sample's drawn
    from its own generator (seeded by the modality's position and the sample's index), so that
    a sample's noise does not depend on the batch it is in."""
    base = (ROBUSTNESS_SEED + position) << 32
    rows = []
    for i in index.tolist():
        gen = torch.Generator().manual_seed(base + int(i))
        rows.append(torch.randn(tuple(shape), generator=gen))
    return torch.stack(rows) * std + mean


def _batches(dataset: Dataset, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, len(dataset))) for s in range(0, len(dataset), batch_size)]


@torch.no_grad()
def robustness_metrics(
    heads: Heads,
    dataset: Dataset,
    predict_missing: PredictMissing,
    encode: Encode,
    modalities: Sequence[str],
    task: str = "classification",
    rates: Sequence[float] = RATES,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """The robustness metrics of the module docstring on ``dataset`` (the test split).

    ``encode`` maps a batch's inputs to latents (the method's evaluation encoding),
    ``heads`` latents to a :class:`ModelOutput`, ``predict_missing(heads, latents, missing)``
    is the method's :meth:`~mmbalance.methods.Method.predict_missing`. The caller puts the
    model in eval mode. With a rate of 0 every metric equals the plain test accuracy.
    """
    outcome = OUTCOMES.get(task)
    clean: dict[str, list[Tensor]] = {}
    targets: list[Tensor] = []
    sums: dict[str, list[float]] = {m: [0.0, 0.0, 0.0] for m in modalities}
    floating = dict.fromkeys(modalities, True)
    for rows in _batches(dataset, batch_size):
        batch: Batch = dataset.__getitems__(rows)  # type: ignore[attr-defined]
        for m in modalities:
            x = batch.inputs[m]
            floating[m] = floating[m] and x.is_floating_point()
            if floating[m]:
                x = x.double()
                sums[m][0] += float(x.sum())
                sums[m][1] += float((x * x).sum())
                sums[m][2] += x.numel()
        batch = batch.to(device)
        for m, z in encode(batch.inputs).items():
            clean.setdefault(m, []).append(z)
        targets.append(batch.targets)
    latents = {m: torch.cat(v) for m, v in clean.items()}
    y = torch.cat(targets)
    n = int(y.shape[0])
    out: dict[str, float] = {}
    for position, m in enumerate(modalities):
        masks = {rate: corrupted_mask(n, position, rate).to(device) for rate in rates}
        for rate, mask in masks.items():
            pred = predict_missing(heads, latents, {m: mask})
            out[rate_key("missing", m, rate)] = outcome.accuracy(pred, y)
        if not floating[m] or sums[m][2] == 0:
            continue
        total, squares, count = sums[m]
        mean = total / count
        std = max(squares / count - mean * mean, 0.0) ** 0.5
        noisy: dict[str, list[Tensor]] = {}
        for rows in _batches(dataset, batch_size):
            batch = dataset.__getitems__(rows)  # type: ignore[attr-defined]
            x = batch.inputs[m]
            noise = sample_noise(batch.index, x.shape[1:], position, mean, std).to(x.dtype)
            inputs = {**batch.inputs, m: noise}
            encoded = encode({k: v.to(device) for k, v in inputs.items()})
            for k, z in encoded.items():
                noisy.setdefault(k, []).append(z)
        noisy_latents = {k: torch.cat(v) for k, v in noisy.items()}
        for rate, mask in masks.items():
            mixed = {
                k: torch.where(mask.reshape(-1, *([1] * (z.ndim - 1))), noisy_latents[k], z)
                for k, z in latents.items()
            }
            pred = predict_missing(heads, mixed, {})
            out[rate_key("noisy", m, rate)] = outcome.accuracy(pred, y)
    for rate in rates:
        values = [out[rate_key("missing", m, rate)] for m in modalities]
        out[summary_key(rate)] = min(values)
    return out
