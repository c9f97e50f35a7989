"""The equal-budget validation search of a comparison: the candidates of each compared method,
and the one rule that chooses among them.

Every method gets the same budget: three values of its main option
(:meth:`Method.searched_option`: its ``search_space``, or the learning rate at 0.5x, 1x and 2x the
configured one), each trained once on seed 0. The test split is never looked at: the choice is
:func:`best_candidate` of the validation selection keys (:func:`~mmbalance.eval.metrics.
selection_key`: the primary validation metric, then minus the validation loss), a run that did
not finish never wins, and a tie goes to the middle value (the default-like one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.builder.resolve import ResolvedConfig
from mmbalance.compare.methods import ComparedMethod
from mmbalance.methods import METHODS

#: A validation selection key (larger is better), or None for a run that did not finish.
Score = tuple[float, float] | None


@dataclass(frozen=True)
class Candidate:
    """One value of a compared method's searched option: its configuration and run directory."""

    label: str
    option: str
    value: float
    config: ResolvedConfig
    run_dir: Path


def with_searched_value(cfg: ResolvedConfig, option: str, value: float) -> ResolvedConfig:
    """``cfg`` with a searched option set to a candidate value (a ``train.lr`` value is a
    multiple of the configured learning rate)."""
    actual = value * cfg.train.lr if option == "train.lr" else value
    return cfg.with_option(option, actual)


def search_candidates(
    method: ComparedMethod, cfg: ResolvedConfig, out_dir: Path
) -> list[Candidate]:
    """The candidates of one compared method, each on seed 0 under
    ``out_dir/search/LABEL/OPTION=V/seed0``. An option the method's label fixes itself
    (``mcr[lam=1]``) is not searched: the method has one candidate, its own."""
    option, values = METHODS.get(method.method).searched_option()
    fixed = dict(method.params)
    if option.startswith("method.") and option.removeprefix("method.") in fixed:
        values = (fixed[option.removeprefix("method.")],)
    return [
        Candidate(
            method.label,
            option,
            value,
            with_searched_value(cfg.with_train(seed=0), option, value),
            out_dir / "search" / method.label / f"{option}={value:g}" / "seed0",
        )
        for value in values
    ]


def best_candidate(scores: Sequence[Score]) -> int:
    """The index of the best candidate by its validation selection key; a candidate that did
    not finish (None) never wins; ties go to the middle one (the default-like value)."""
    middle = len(scores) // 2
    ranked = [
        ((s if s is not None else (-math.inf, -math.inf)), i == middle, -i)
        for i, s in enumerate(scores)
    ]
    return max(range(len(scores)), key=lambda i: ranked[i])


@dataclass(frozen=True)
class SearchOutcome:
    """The search of one compared method: its candidates' values and validation selection keys,
    and the chosen value."""

    label: str
    option: str
    values: tuple[float, ...]
    scores: tuple[Score, ...]

    @property
    def chosen(self) -> float:
        return self.values[best_candidate(self.scores)]

    def to_json(self) -> dict[str, Any]:
        """``search.json``'s entry: every candidate's primary validation metric (None: it did
        not finish) and the chosen value."""
        return {
            "method": self.label,
            "option": self.option,
            "scores": {
                f"{v:g}": s[0] if s is not None else None
                for v, s in zip(self.values, self.scores, strict=True)
            },
            "chosen": self.chosen,
        }
