"""End-of-run analysis: linear probes, Shapley contributions and error analysis on one split.

The latents of both splits are computed once and shared by the three measurements. What counts as
a right prediction comes from :mod:`mmbalance.eval.correctness`: the class for classification, the
sign (non-zero targets only) for regression. For regression the Shapley values are those of the
binary accuracy of the sign (``contribution``, on the same scale as classification accuracy) and,
from the same forward passes, of minus the MAE (``contribution_neg_mae``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.eval.contribution import Removal, coalition_scores, contributions_from_values
from mmbalance.eval.correctness import OUTCOMES
from mmbalance.eval.error_analysis import error_analysis
from mmbalance.eval.probe import latents_of, probe_predictions
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import ModelOutput

#: Shapley scores computed per task, the first one being the headline ``contribution``.
TASK_SCORES: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "regression": ("accuracy", "neg_mae"),
}


@torch.no_grad()
def analyze_model(
    model: MultimodalModel,
    train: Dataset,
    test: Dataset,
    predict: Callable[[ModelOutput], Tensor] | None = None,
    removal: Removal = "permute",
    task: str = "classification",
    encode: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Returns ``(analysis, scalars)`` for a classification or regression model.

    ``analysis`` (JSON-ready) holds the probe accuracies, Shapley contributions of each modality
    to the accuracy of ``predict(output)`` on ``test`` and the error analysis, whose unimodal
    predictors are the model's unimodal heads when it has them, else the linear probes.
    ``scalars`` are the flat summaries for the run's test metrics: ``probe_accuracy_<m>``,
    ``shapley_<m>``, ``imbalance_degree``, ``routing_rate`` and ``synergy_rate``.

    ``encode`` maps a batch's inputs to latents (default ``model.encode``); the trainer passes
    the method's :meth:`~mmbalance.methods.Method.encode_eval`, so that a method that changes
    the architecture is analysed as it was trained and evaluated.
    """
    predict = predict or (lambda out: out.logits)
    outcome = OUTCOMES.get(task)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    z_train, y_train = latents_of(model, train, encode=encode)
    z_test, y_test = latents_of(model, test, encode=encode)
    probes = probe_predictions(z_train, y_train, z_test, task=task)
    probe_acc = {m: outcome.accuracy(p, y_test) for m, p in probes.items()}
    z_dev = {m: z.to(device) for m, z in z_test.items()}
    values = coalition_scores(
        model.heads, z_dev, y_test, TASK_SCORES[task], removal, predict, task=task
    )
    contribs = {
        score: contributions_from_values(v, list(z_test), removal, score)
        for score, v in values.items()
    }
    output = model.heads(z_dev)
    fused = predict(output).cpu()
    if output.unimodal_logits:
        source = "unimodal_heads"
        unimodal = {m: u.cpu() for m, u in output.unimodal_logits.items()}
    else:
        source = "linear_probes"
        unimodal = probes
    scored = outcome.scored(y_test).cpu()
    errors = error_analysis(
        outcome.labels(fused)[scored],
        {m: outcome.labels(u)[scored] for m, u in unimodal.items()},
        outcome.target_labels(y_test)[scored],
    )
    errors |= {
        "unimodal_predictors": source,
        "right_means": outcome.description,
        "not_scored": int((~scored).sum()),
    }
    model.train(was_training)
    contrib = contribs[TASK_SCORES[task][0]]
    analysis = {"probe_accuracy": probe_acc, "contribution": contrib, "errors": errors}
    analysis |= {f"contribution_{s}": contribs[s] for s in TASK_SCORES[task][1:]}
    scalars = {f"probe_accuracy_{m}": v for m, v in probe_acc.items()}
    scalars |= {f"shapley_{m}": v for m, v in contrib["shapley"].items()}
    scalars["imbalance_degree"] = contrib["imbalance_degree"]
    scalars |= {k: errors[k] for k in ("routing_rate", "synergy_rate") if errors[k] is not None}
    return analysis, scalars
