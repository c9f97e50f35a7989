"""MMCosine: multimodal cosine loss (Xu et al., ICASSP 2023).

The method is its head: the fused logits are ``sum_m s * cos(z_m, W_m^c)`` (the ``cosine`` fusion
head, :mod:`mmbalance.models.cosine_head`: L2-normalised latents and class weights per modality,
scale ``s`` = ``fusion.scale``, no bias), trained with plain cross-entropy. Normalising both sides
removes the feature- and weight-norm route by which one modality takes over the fused logits;
each modality's share is bounded by ``[-s, s]``.

The method declares ``fusion = "cosine"``: runs use that head by default and refuse another.

Evaluation scores **the same head that is trained** (the cosine logits). The official code
(``GeWu-Lab/MMCosine_ICASSP23``, ``main_CD.py::valid``) does not: it reports the accuracy of the
plain linear concat logits ``W [a; v] + b`` of the same weights, with a bias that training never
updates, i.e. of a classifier other than the trained one; BalanceBenchmark and the MCR authors'
port evaluate the cosine logits, as here.

Not included: the optional cross-modal NCE term of the supplementary material (weight 0 by
default in the official code). The official code's gated/FiLM variants apply the cosine to the
fusion module's post-fusion features; here the cosine head is a late-fusion head on the encoders'
latents (the official ``concat`` setting).

Official settings: ``s = 10``; SGD lr 1e-3, momentum 0.9, weight decay 1e-4, StepLR(100, 0.1),
200 epochs, batch 32 (CREMA-D). BalanceBenchmark uses ``s = 15``.
"""

from __future__ import annotations

from mmbalance.methods.base import METHODS, Method


@METHODS.register("mmcosine")
class MMCosine(Method):
    """MMCosine (ICASSP 2023): cross-entropy on the sum of per-modality scaled cosine logits."""

    name = "mmcosine"
    fusion = "cosine"
    search_space = ("fusion.scale", (5.0, 10.0, 15.0))
