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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.builder.resolve import ResolvedConfig, resolve_config
from mmbalance.compare.methods import ComparedMethod
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS

#: A validation selection key (larger is better), or None for a run that did not finish.
Score = tuple[float, float] | None


@dataclass(frozen=True)
class Candidate:
    """One value of a compared method's searched option: its configuration and run directory,
    or (``config`` None) why that value's run is refused: a value at which the method would
    never act on the run's schedule, say (``mslr``'s window of 10 epochs on a 6-epoch run)."""

    label: str
    option: str
    value: float
    config: ResolvedConfig | None
    run_dir: Path
    refusal: str = ""


def config_with_value(options: Mapping[str, Any], option: str, value: float) -> ResolvedConfig:
    """The run of the flat ``options`` with a searched option at a candidate value (a
    ``train.lr`` value is a multiple of the configured learning rate), checked like any run
    (ConfigError when it is refused)."""
    if option == "train.lr":
        base = resolve_config(options)
        return base.with_train(lr=value * base.train.lr)
    return resolve_config({**options, option: value})


def search_candidates(
    method: ComparedMethod, options: Mapping[str, Any], out_dir: Path
) -> list[Candidate]:
    """The candidates of one compared method (``options``: its runs' flat options), each on
    seed 0 under ``out_dir/search/LABEL/OPTION=V/seed0``. An option the method's label fixes
    itself (``mcr[lam=1]``) is not searched: the method has one candidate, its own.

    A value whose run is refused is a candidate that is not run (it never wins), so a method
    whose default would be refused on the study's schedule is still searched at its other
    values; when every value is refused, the comparison is refused with the default-like
    (middle) value's reason, before anything trains."""
    option, values = METHODS.get(method.method).searched_option()
    fixed = dict(method.params)
    if option.startswith("method.") and option.removeprefix("method.") in fixed:
        values = (fixed[option.removeprefix("method.")],)
    out = []
    for value in values:
        config, refusal = None, ""
        try:
            config = config_with_value(options, option, value).with_train(seed=0)
        except ConfigError as err:
            refusal = str(err)
        run_dir = out_dir / "search" / method.label / f"{option}={value:g}" / "seed0"
        out.append(Candidate(method.label, option, value, config, run_dir, refusal))
    if all(c.config is None for c in out):
        raise ConfigError(out[len(out) // 2].refusal)
    return out


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
    #: per value, why its run was refused ("" for a value that was run)
    refusals: tuple[str, ...] = ()

    @property
    def chosen_index(self) -> int:
        """:func:`best_candidate` of the scores; when no candidate finished, the default-like
        (middle, then the next) value that was not refused."""
        best = best_candidate(self.scores)
        if self.scores[best] is None and self.refusals and self.refusals[best]:
            count = len(self.values)
            order = [*range(count // 2, count), *range(count)]
            best = next((i for i in order if not self.refusals[i]), best)
        return best

    @property
    def chosen(self) -> float:
        return self.values[self.chosen_index]

    def to_json(self) -> dict[str, Any]:
        """``search.json``'s entry: every candidate's primary validation metric (None: it did
        not finish or was refused), the chosen value, and why a refused candidate was."""
        reasons = self.refusals or ("",) * len(self.values)
        refused = {f"{v:g}": r for v, r in zip(self.values, reasons, strict=True) if r}
        out: dict[str, Any] = {
            "method": self.label,
            "option": self.option,
            "scores": {
                f"{v:g}": s[0] if s is not None else None
                for v, s in zip(self.values, self.scores, strict=True)
            },
            "chosen": self.chosen,
        }
        if refused:
            out["refused"] = refused
        return out
