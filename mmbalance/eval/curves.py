"""Per-epoch, per-modality curves computed from the validation pass the loop already makes.

After each epoch's validation the trainer (``train.epoch_curves``, on by default) hands this
module the gathered validation predictions, targets and pooled latents, and gets back, per
modality ``m``:

* ``head_acc_<m>``: accuracy of the unimodal head of ``m`` (models with unimodal heads only);
* ``probe_acc_<m>``: accuracy of a split-half closed-form ridge probe on the validation latents
  of ``m`` (every model; :func:`~mmbalance.eval.probe.split_half_probe_accuracy`);
* ``shapley_<m>``: the Shapley value of ``m`` for the fused validation accuracy, with absent
  modalities permuted within the validation set (:mod:`~mmbalance.eval.contribution`);

plus ``imbalance_degree`` of those Shapley values. "Accuracy" is that of
:mod:`~mmbalance.eval.correctness`: the class accuracy, or for regression the binary accuracy of the
sign, so the three quantities share one scale whatever the task.

Nothing here runs an encoder: the probe and the Shapley values reuse the latents of the
validation pass, and the ``2^M`` coalitions only re-run the heads. The work is a few small matrix
products, so it runs on one CPU thread: on a busy machine, intra-op threads waiting for each other
cost far more than the work itself (AV-Digits validation latents on 2 shared cores: 6 ms median
on one thread, 35-50 ms and spikes of 0.7 s on two).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

from mmbalance.eval.contribution import coalition_values, imbalance_degree, shapley_from_values
from mmbalance.eval.correctness import OUTCOMES
from mmbalance.eval.probe import split_half_probe_accuracy
from mmbalance.models.output import ModelOutput

#: The per-modality quantities, in the order reports show them.
QUANTITIES: dict[str, str] = {
    "head_acc": "unimodal-head accuracy",
    "probe_acc": "split-half ridge-probe accuracy",
    "shapley": "Shapley value (fused accuracy)",
}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU operations on one thread, restoring the previous count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def epoch_curves(
    heads: Callable[[Mapping[str, Tensor]], ModelOutput],
    latents: Mapping[str, Tensor],
    targets: Tensor,
    predict: Callable[[ModelOutput], Tensor],
    task: str,
    num_outputs: int,
    unimodal: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """The per-modality curve values of one epoch (see the module docstring).

    ``latents`` are the validation latents by modality (on the heads' device), ``unimodal`` the
    unimodal heads' predictions by modality, when the model has heads.
    """
    outcome = OUTCOMES.get(task)
    out: dict[str, float] = {}
    with _one_thread():
        for m, u in (unimodal or {}).items():
            out[f"head_acc_{m}"] = outcome.accuracy(u, targets)
        for m, z in latents.items():
            out[f"probe_acc_{m}"] = split_half_probe_accuracy(z, targets, task, num_outputs)
        values = coalition_values(heads, latents, targets, "permute", predict, task=task)
    phi = shapley_from_values(values, list(latents))
    out |= {f"shapley_{m}": v for m, v in phi.items()}
    out["imbalance_degree"] = imbalance_degree(phi)
    return out
