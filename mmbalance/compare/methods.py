"""What a comparison compares: the methods of ``--methods`` and their configurations.

Methods are names or variants. ``ogm_ge[alpha=1.2]`` trains ``ogm_ge`` with ``alpha=1.2`` under
the label ``ogm_ge[alpha=1.2]``, exactly as spelled, in results and in its run directories; a
bare name expands through :meth:`Method.variants` (``unimodal`` becomes one entry per modality);
a named set (:data:`METHOD_SETS`, ``all``) expands to its methods. Options given as
``method.KEY=V`` next to the methods apply to every compared method that has an option ``KEY``
and to no other (one that none has is an error); bracketed options override them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmbalance.config import parse_value
from mmbalance.errors import ConfigError, shown
from mmbalance.methods import METHODS


@dataclass(frozen=True)
class ComparedMethod:
    """One compared configuration: a label, a method name and its options."""

    label: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()


#: Named sets of methods, usable in ``--methods`` (``--methods table1`` or ``table1,umt``).
#: ``table1``: the rows of the MCR paper's Table 1 (Kontras et al., NeurIPS 2025): the unimodal
#: models, their ensemble, joint training, multi-loss, the unimodal pre-training baselines, the
#: eight published methods (OGM as the OGM-GE its code runs) and MCR. ``recent``: the 2025
#: methods that later papers compare against (AUG, DGL, G2D, Data Remixing, MIDAS).
#: ``references``: what every balancing method is judged against. ``all``: every registered
#: method.
METHOD_SETS: dict[str, tuple[str, ...]] = {
    "table1": (
        "unimodal",
        "ensemble",
        "joint",
        "multiloss",
        "unipre_frozen",
        "unipre_finetuned",
        "mslr",
        "mmcosine",
        "ogm_ge",
        "agm",
        "mlb",
        "reconboost",
        "mmpareto",
        "dr",
        "mcr",
    ),
    "recent": ("aug", "dgl", "g2d", "remix", "midas"),
    "references": ("joint", "ensemble", "unimodal"),
}


def method_set(name: str) -> tuple[str, ...] | None:
    """The methods of a named set (``all``: every registered method, joint first), or None."""
    if name == "all":
        return ("joint", *(m for m in METHODS.names() if m != "joint"))
    return METHOD_SETS.get(name)


def split_methods(text: str) -> list[str]:
    """Split ``--methods`` at the commas outside brackets (``a,b[x=1,y=2]`` is two entries) and
    expand named sets (:data:`METHOD_SETS`, ``all``), keeping the first mention of a method
    that a set and the list both name; empty items are dropped, and naming no method at all is
    an error."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items = [m for m in [*items, current.strip()] if m]
    if not items:
        raise ConfigError(f"--methods {text!r} names no method")
    if not any(method_set(m) for m in items):
        return items
    expanded: list[str] = []
    for item in items:
        for m in method_set(item) or (item,):
            if m not in expanded:
                expanded.append(m)
    return expanded


#: The longest method label: it names a directory (file systems allow 255 bytes per name).
MAX_LABEL_BYTES = 120

_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_]+)(\[(?P<options>.*)\])?")


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any] | None]:
    """``"ogm_ge[alpha=1.2,ge=false]"`` -> ``("ogm_ge", {"alpha": 1.2, "ge": False})``; a bare
    name gives ``(name, None)``. Values are read as YAML, as on the command line."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None or "/" in spec or "\\" in spec:  # the label names a directory
        raise ConfigError(f"method {shown(spec)} is not NAME or NAME[KEY=VALUE,...]")
    if len(spec.strip().encode()) > MAX_LABEL_BYTES or any(ord(c) < 32 for c in spec):
        raise ConfigError(
            f"method {shown(spec)} is longer than {MAX_LABEL_BYTES} bytes or holds control "
            "characters; its label names its runs' directory"
        )
    if match["options"] is None:
        return match["name"], None
    options: dict[str, Any] = {}
    for pair in split_methods(match["options"]) if match["options"].strip() else []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method {spec!r}: expected KEY=VALUE, got {pair!r}")
        options[key.strip()] = parse_value(value.strip())
    return match["name"], options


def expand_methods(names: Sequence[str], modalities: Sequence[str]) -> list[ComparedMethod]:
    """Turn method names and variants into compared entries: a bare name through its
    :meth:`Method.variants`, ``NAME[KEY=V,...]`` as one entry labelled as spelled."""
    entries: list[ComparedMethod] = []
    for spec in names:
        name, options = parse_method_spec(spec)
        cls = METHODS.get(name)  # unknown names fail here, before anything trains
        if options is None:
            for label, params in cls.variants(name, modalities):
                entries.append(ComparedMethod(label, name, tuple(sorted(params.items()))))
        else:
            entries.append(ComparedMethod(spec.strip(), name, tuple(options.items())))
    seen: set[str] = set()
    for e in entries:
        if e.label in seen:
            raise ConfigError(f"--methods lists {e.label!r} twice")
        seen.add(e.label)
    return entries


def shared_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The keys every compared run shares: all but ``method=NAME`` (e.g. from a training YAML,
    superseded by the compared methods) and the method-scoped ``method.KEY`` options."""
    return {k: v for k, v in overrides.items() if k != "method" and not k.startswith("method.")}


def _scoped_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The method-scoped ``method.KEY`` options, by ``KEY``."""
    return {k.removeprefix("method."): v for k, v in overrides.items() if k.startswith("method.")}


def method_options(
    entries: Sequence[ComparedMethod], overrides: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The flat options of every compared method's runs: the shared options, ``method=NAME``,
    and the ``method.KEY`` options given next to the methods that it has, under its label's own;
    a method-scoped option that no compared method has is refused."""
    shared, scoped = shared_options(overrides), _scoped_options(overrides)
    used: set[str] = set()
    out = []
    for e in entries:
        fields = {f.name for f in dataclasses.fields(METHODS.get(e.method).Params)}
        options = {k: v for k, v in scoped.items() if k in fields} | dict(e.params)
        used |= options.keys() & scoped.keys()
        out.append({**shared, "method": e.method, **{f"method.{k}": v for k, v in options.items()}})
    unused = [k for k in scoped if k not in used]
    if unused:
        names = ", ".join(dict.fromkeys(e.method for e in entries))
        raise ConfigError(
            f"method.{unused[0]} is an option of none of the compared methods ({names})"
        )
    return out


def refuse_same_runs(labels: Sequence[str], keys: Sequence[Any]) -> None:
    """Refuse two compared methods whose runs are the same configuration (``keys``: what each
    one trains, e.g. its :meth:`~mmbalance.builder.resolve.ResolvedConfig.identity`)."""
    for i, key in enumerate(keys):
        for j in range(i):
            if keys[j] == key:
                raise ConfigError(
                    f"{labels[j]} and {labels[i]} are the same configuration; "
                    "compare each configuration once"
                )
