"""Pieces that several methods share, so that no method file imports another.

- :mod:`~mmbalance.methods.ops.discrepancy`: the per-batch discrepancy score and the modulation
  schedule of OGM, OGM-GE and OPM; the batch sums of the true-class probability (InfoReg's and
  G2D's scores too);
- :mod:`~mmbalance.methods.ops.modality_logits`: each modality's own class logits (MBSD, AMCo,
  LFM, InfoReg);
- :mod:`~mmbalance.methods.ops.divergence`: Jensen-Shannon divergences, plain and with
  hand-written, game-routed gradients (MCR, LFM);
- :mod:`~mmbalance.methods.ops.contrastive`: supervised NT-Xent (MCR);
- :mod:`~mmbalance.methods.ops.mcr_game`: MCR's sets, donors, game weights and routing;
- :mod:`~mmbalance.methods.ops.gradients`: identity forward, scaled backward (MLB, AGM, MCR);
- :mod:`~mmbalance.methods.ops.min_norm`: the MGDA min-norm solver (MMPareto);
- :mod:`~mmbalance.methods.ops.modes`: eval mode for a while (AGM's masked passes, the feature
  pass of :mod:`mmbalance.methods.protocol`);
- :mod:`~mmbalance.methods.ops.precision`: the arithmetic precision of the hand-differentiated
  losses;
- :mod:`~mmbalance.methods.ops.one_modality_per_part`: steps with one optimizer step per
  modality, each encoding its modality alone (MLA, AUG);
- :mod:`~mmbalance.methods.ops.frozen_teachers`: frozen copies of parts of the model kept in a
  method's state (the unimodal teachers of UMT and G2D).

A method file imports :mod:`mmbalance.methods.base` and these modules, never another method file
(``tests/test_layers.py`` checks it).
"""
