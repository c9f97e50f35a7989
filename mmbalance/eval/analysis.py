"""End-of-run analysis: linear probes, Shapley contributions and error analysis on one split.

The latents of both splits are computed once and shared by the three measurements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.eval.contribution import Removal, shapley_contributions
from mmbalance.eval.errors import error_analysis
from mmbalance.eval.probe import latents_of, probe_predictions
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import ModelOutput


@torch.no_grad()
def analyze_model(
    model: MultimodalModel,
    train: Dataset,
    test: Dataset,
    predict: Callable[[ModelOutput], Tensor] | None = None,
    removal: Removal = "permute",
) -> tuple[dict[str, Any], dict[str, float]]:
    """Returns ``(analysis, scalars)`` for a classification model.

    ``analysis`` (JSON-ready) holds the probe accuracies, Shapley contributions of each modality
    to the accuracy of ``predict(output)`` on ``test`` and the error analysis, whose unimodal
    predictors are the model's unimodal heads when it has them, else the linear probes.
    ``scalars`` are the flat summaries for the run's test metrics: ``probe_accuracy_<m>``,
    ``shapley_<m>``, ``imbalance_degree``, ``routing_rate`` and ``synergy_rate``.
    """
    predict = predict or (lambda out: out.logits)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    z_train, y_train = latents_of(model, train)
    z_test, y_test = latents_of(model, test)
    probes = probe_predictions(z_train, y_train, z_test)
    probe_acc = {m: float(np.mean(p.numpy() == y_test.numpy())) for m, p in probes.items()}
    z_dev = {m: z.to(device) for m, z in z_test.items()}
    contrib = shapley_contributions(model.heads, z_dev, y_test, removal, predict)
    output = model.heads(z_dev)
    fused = predict(output).argmax(-1).cpu()
    if output.unimodal_logits:
        source = "unimodal_heads"
        unimodal = {m: u.argmax(-1).cpu() for m, u in output.unimodal_logits.items()}
    else:
        source = "linear_probes"
        unimodal = probes
    errors = error_analysis(fused, unimodal, y_test) | {"unimodal_predictors": source}
    model.train(was_training)
    analysis = {"probe_accuracy": probe_acc, "contribution": contrib, "errors": errors}
    scalars = {f"probe_accuracy_{m}": v for m, v in probe_acc.items()}
    scalars |= {f"shapley_{m}": v for m, v in contrib["shapley"].items()}
    scalars["imbalance_degree"] = contrib["imbalance_degree"]
    scalars |= {k: errors[k] for k in ("routing_rate", "synergy_rate") if errors[k] is not None}
    return analysis, scalars
