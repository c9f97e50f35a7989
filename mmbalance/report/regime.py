"""Do the modalities compete? The criteria of the competition-regime search, on numbers per seed.

One implementation, used by ``benchmarks/find_av_regime.py`` (which searched the AV-Fashion
settings with them) and by ``mmbalance diagnose``. Each seed contributes the runs that involve no
balancing method: ``joint``, the ``ensemble`` of unimodal models, each modality alone, the
linear probe of each encoder inside joint and alone, each modality's Shapley value in joint, and
a *stacked probe* (a linear probe on both unimodal encoders' concatenated features: what a linear
fusion of them can reach). The criteria were fixed before the search ran a single candidate:

1. ``gap``: joint is below the ensemble by at least :data:`MIN_GAP` (2 points) of test accuracy,
   and the mean paired difference (ensemble - joint, same seed) exceeds :data:`GAP_SE_FACTOR`
   (2) standard errors;
2. ``unimodal``: each modality alone is in :data:`UNIMODAL_RANGE` ([0.45, 0.85]) (a benchmark
   criterion: both informative, neither saturated; the diagnosis shows it but does not use it);
3. ``probe``: the *weak* modality's probe inside joint is at least :data:`MIN_PROBE_DEFICIT` (3
   points) below the same encoder's trained alone; the weak modality is the one with the smaller
   Shapley value in joint (mean over seeds), so the joint model names it, not the probes;
4. ``complementary``: the fused estimate, the better of the ensemble and the stacked probe, is at
   least :data:`MIN_FUSION_GAIN` (3 points) above the best modality alone.

:func:`verdict` turns them into one of three plain-words answers (thresholds above, tested on
hand-made numbers): *one modality carries almost everything* when criterion 4 fails (fusion has
little to gain, whatever competition there is); else *competition present* when criterion 1 or
3 holds; else *no competition*. Accuracy means the task's accuracy of
:mod:`mmbalance.eval.outcome` (the sign for regression).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mmbalance.report.stats import Stat, _paired_p, describe

# --- the criteria (fixed before the regime search) ------------------------------------------------
MIN_GAP = 0.02  # ensemble - joint, test accuracy
GAP_SE_FACTOR = 2.0  # the mean paired difference must exceed this many standard errors
UNIMODAL_RANGE = (0.45, 0.85)
MIN_PROBE_DEFICIT = 0.03  # weak modality: probe alone - probe inside joint
MIN_FUSION_GAIN = 0.03  # fused upper estimate - best unimodal

Kind = Literal["competition", "no_competition", "one_modality"]


@dataclass(frozen=True)
class SeedNumbers:
    """The numbers of one seed (test split).

    Attributes:
        joint, ensemble: accuracy of joint training and of the unimodal ensemble.
        alone: each modality's accuracy alone.
        probe_alone, probe_joint: each encoder's linear-probe accuracy, trained alone and
            inside joint.
        shapley_joint: each modality's Shapley value for joint's accuracy.
        stacked_probe: the stacked probe's accuracy (``None`` when not measured).
    """

    joint: float
    ensemble: float
    alone: Mapping[str, float]
    probe_alone: Mapping[str, float]
    probe_joint: Mapping[str, float]
    shapley_joint: Mapping[str, float]
    stacked_probe: float | None = None


@dataclass
class RegimeEvidence:
    """The criteria's numbers over seeds (means; ``Stat`` with their 95 % t intervals)."""

    seeds: int
    modalities: list[str]
    joint: Stat
    ensemble: Stat
    gap: Stat  # ensemble - joint, paired
    gap_se: float
    gap_p: float  # paired t-test, two-sided
    alone: dict[str, Stat]
    probe_alone: dict[str, Stat]
    probe_joint: dict[str, Stat]
    probe_deficit: dict[str, Stat]  # alone - inside joint, paired
    shapley_joint: dict[str, Stat]
    weak: str
    stacked_probe: float | None
    fused_estimate: float
    fusion_gain: float
    met: dict[str, bool] = field(default_factory=dict)


def regime_stat(values: Sequence[float]) -> Stat:
    """Mean and 95 % interval of at least one value."""
    stat = describe(values)
    if stat is None:
        raise ValueError("no finite value to describe")
    return stat


def regime_evidence(seeds: Sequence[SeedNumbers]) -> RegimeEvidence:
    """The four criteria on the seeds run so far (module docstring)."""
    if not seeds:
        raise ValueError("no seed to judge")
    mods = list(seeds[0].alone)
    diffs = [s.ensemble - s.joint for s in seeds]
    gap = regime_stat(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    alone = {m: regime_stat([s.alone[m] for s in seeds]) for m in mods}
    shapley = {m: regime_stat([s.shapley_joint[m] for s in seeds]) for m in mods}
    weak = min(mods, key=lambda m: shapley[m].mean)
    probe_alone = {m: regime_stat([s.probe_alone[m] for s in seeds]) for m in mods}
    probe_joint = {m: regime_stat([s.probe_joint[m] for s in seeds]) for m in mods}
    deficit = {m: regime_stat([s.probe_alone[m] - s.probe_joint[m] for s in seeds]) for m in mods}
    stacked_values = [s.stacked_probe for s in seeds if s.stacked_probe is not None]
    stacked = statistics.fmean(stacked_values) if stacked_values else None
    ensemble = regime_stat([s.ensemble for s in seeds])
    fused = max(stacked, ensemble.mean) if stacked is not None else ensemble.mean
    best_alone = max(a.mean for a in alone.values())
    evidence = RegimeEvidence(
        seeds=len(seeds),
        modalities=mods,
        joint=regime_stat([s.joint for s in seeds]),
        ensemble=ensemble,
        gap=gap,
        gap_se=se,
        gap_p=_paired_p(diffs),
        alone=alone,
        probe_alone=probe_alone,
        probe_joint=probe_joint,
        probe_deficit=deficit,
        shapley_joint=shapley,
        weak=weak,
        stacked_probe=stacked,
        fused_estimate=fused,
        fusion_gain=fused - best_alone,
    )
    evidence.met = criteria_met(evidence)
    return evidence


def criteria_met(evidence: RegimeEvidence) -> dict[str, bool]:
    """Which of the four criteria hold (module docstring)."""
    gap, se = evidence.gap.mean, evidence.gap_se
    low, high = UNIMODAL_RANGE
    return {
        "gap": gap >= MIN_GAP and evidence.seeds > 1 and gap > GAP_SE_FACTOR * se,
        "unimodal": all(low <= a.mean <= high for a in evidence.alone.values()),
        "probe": evidence.probe_deficit[evidence.weak].mean >= MIN_PROBE_DEFICIT,
        "complementary": evidence.fusion_gain >= MIN_FUSION_GAIN,
    }


@dataclass(frozen=True)
class Verdict:
    """The answer in plain words: its kind and the sentence that says it with the numbers."""

    kind: Kind
    sentence: str


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def points_interval(stat: Stat) -> str:
    """``+0.3 ± 0.8 points``: a difference and its 95 % interval, in points (hundredths)."""
    if stat.n < 2:
        return f"{_points(stat.mean)} points"
    return f"{_points(stat.mean)} ± {100 * stat.half_width:.1f} points"


def verdict(evidence: RegimeEvidence) -> Verdict:
    """One of three answers, built from the criteria (module docstring)."""
    met = evidence.met or criteria_met(evidence)
    weak = evidence.weak
    if not met["complementary"]:
        best = max(evidence.alone, key=lambda m: evidence.alone[m].mean)
        return Verdict(
            "one_modality",
            f"one modality carries almost everything: fusion has little to gain ({best} alone "
            f"reaches {evidence.alone[best].mean:.2f}, the best fusion estimate "
            f"{evidence.fused_estimate:.2f}, {_points(evidence.fusion_gain)} points, under the "
            f"{100 * MIN_FUSION_GAIN:.0f} points a fusion should add)",
        )
    if met["probe"] or met["gap"]:
        parts = []
        if met["probe"]:
            parts.append(
                f"the {weak} encoder reaches {evidence.probe_joint[weak].mean:.2f} inside joint "
                f"against {evidence.probe_alone[weak].mean:.2f} alone (linear probes)"
            )
        gap = f"joint {points_interval(_negated(evidence.gap))} against the ensemble"
        if not math.isnan(evidence.gap_p):
            gap += f" (paired p = {evidence.gap_p:.2g})"
        parts.append(gap if met["gap"] else f"{gap}, not beyond the seed noise")
        return Verdict("competition", "competition present: " + "; ".join(parts))
    return Verdict(
        "no_competition",
        "no competition: joint already matches the ensemble "
        f"({points_interval(_negated(evidence.gap))}), and the {weak} encoder learns as much "
        f"inside joint as alone (probe {evidence.probe_joint[weak].mean:.2f} against "
        f"{evidence.probe_alone[weak].mean:.2f})",
    )


def _negated(stat: Stat) -> Stat:
    return Stat(-stat.mean, stat.std, stat.n, stat.half_width)
