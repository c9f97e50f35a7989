"""Option documentation: every option of every registered component has help text, extracted by
one convention (mmbalance.config), and ``mmbalance list`` shows it readably."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mmbalance.cli import build_parser, main, registered_components
from mmbalance.config import (
    TrainConfig,
    dataclass_options,
    docstring_entries,
    docstring_summary,
    plain_text,
    signature_options,
    type_text,
    value_text,
)


def test_every_option_of_every_registered_component_has_help() -> None:
    """A new method, dataset, encoder or fusion head must document each of its options: in an
    ``Attributes:`` section of its Params docstring (or Args: of an encoder's or fusion head's
    class docstring). The failure lists exactly what is missing."""
    missing = []
    for c in registered_components():
        for title, _, options in [("options", "", c.options), *c.extra]:
            where = c.kind if title == "options" else f"{c.kind} {title}"
            missing += [f"{where} {c.name}: {o.name}" for o in options if not o.help]
    assert not missing, (
        "options without help text (document each in the Attributes: section of the Params "
        "docstring, or the Args: section of an encoder's or fusion head's class docstring; "
        "see mmbalance/config.py):\n  " + "\n  ".join(missing)
    )


def _documented_classes() -> list[tuple[str, type, set[str]]]:
    """Every class whose docstring documents options, with the names it may document."""
    from mmbalance.data import DATASETS
    from mmbalance.methods import METHODS
    from mmbalance.models import ENCODERS, FUSION_HEADS

    params = {TrainConfig, *(cls.Params for _, cls in METHODS.items())}
    for _, source in DATASETS.items():
        params |= {source.Params, *([source.PrepareParams] if source.PrepareParams else [])}
    out = []
    for cls in params:
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass):
                names = {f.name for f in dataclasses.fields(klass)}
                out.append((klass.__qualname__, klass, names))
    for _, factory in [*ENCODERS.items(), *FUSION_HEADS.items()]:
        out.append((factory.__qualname__, factory, set(inspect.signature(factory).parameters)))
    return out


def test_no_docstring_documents_an_option_that_does_not_exist() -> None:
    """A renamed option whose old name stays in the docstring would show stale help."""
    stale = []
    for name, cls, options in _documented_classes():
        documented = set(docstring_entries(cls.__dict__.get("__doc__")))
        stale += [f"{name}: {entry}" for entry in sorted(documented - options)]
    assert not stale, "documented options that do not exist:\n  " + "\n  ".join(stale)


def test_docstring_entries_read_google_style_sections() -> None:
    doc = """Summary line.

    Longer text that mentions lam: not an entry.

    Attributes:
        lam: the weight of the term,
            continued on a second line.
        a, b: two options documented at once.
        mode (str): ``fast`` or :class:`~pkg.mod.Slow`.

        after_blank: still in the section.
    Note:
        not_an_option: outside the section.
    """
    assert docstring_entries(doc) == {
        "lam": "the weight of the term, continued on a second line.",
        "a": "two options documented at once.",
        "b": "two options documented at once.",
        "mode": "fast or Slow.",
        "after_blank": "still in the section.",
    }
    assert docstring_entries(None) == {} and docstring_entries("No sections.") == {}
    assert docstring_entries("Args:\n    x: first.\n    y:\n        on its own line.") == {
        "x": "first.",
        "y": "on its own line.",
    }


@dataclass
class _Base:
    """Base options.

    Attributes:
        shared: documented once, in the base class.
    """

    shared: int = 1


@dataclass
class _Child(_Base):
    """Options with a ``#:`` comment as the fallback and one field left undocumented.

    Attributes:
        mode: the documented mode.
    """

    mode: Literal["a", "b"] = "a"
    #: from the comment above the field,
    #: over two lines.
    commented: float | None = None
    trailing: list[int] = field(default_factory=lambda: [1, 2])  #: from the end of the line.
    bare: str = ""
    required_one: int = field(default=0)


def test_dataclass_options_with_inherited_help_comment_fallback_and_defaults() -> None:
    options = {o.name: o for o in dataclass_options(_Child)}
    assert list(options) == ["shared", "mode", "commented", "trailing", "bare", "required_one"]
    assert options["shared"].help == "documented once, in the base class."
    assert options["mode"].help == "the documented mode." and options["mode"].type == "a | b"
    assert options["commented"].help == "from the comment above the field, over two lines."
    assert options["commented"].type == "float | null" and options["commented"].default is None
    assert options["trailing"].help == "from the end of the line."
    assert options["trailing"].default == [1, 2] and options["trailing"].type == "list of int"
    assert options["bare"].help == ""  # what the completeness test reports


@dataclass
class _NeedsValue:
    """Attributes:
    value: a required option.
    """

    value: int


def test_required_fields_and_signature_options() -> None:
    (option,) = dataclass_options(_NeedsValue)
    assert option.required and option.help == "a required option."

    class Head:
        """A head.

        Args:
            hidden: hidden width.
            target: the target modality.
        """

        def __init__(
            self,
            dims: dict,
            outputs: int,
            hidden: int = 8,
            target: str | None = None,
            **rest: object,
        ) -> None:
            """Args:
            needed: not a parameter here.
            """

    options = signature_options(Head, positional=2)
    assert [(o.name, o.type, o.default, o.help) for o in options] == [
        ("hidden", "int", 8, "hidden width."),
        ("target", "str | null", None, "the target modality."),
    ]

    def factory(shape: tuple[int, ...], width: int) -> None:
        """Args:
        width: channels.
        """

    (width,) = signature_options(factory, positional=1)
    assert width.required and width.help == "channels."


def test_types_values_and_plain_text_as_a_user_reads_them() -> None:
    assert type_text(Literal["greedy", "independent"]) == "greedy | independent"
    assert type_text(int | None) == "int | null"
    assert type_text(tuple[int, ...]) == "list of int"
    assert type_text(dict[str, int]) == "mapping"
    assert [value_text(v) for v in (None, True, False, [1, 0.5], "", "x", 1e-5)] == [
        "null",
        "true",
        "false",
        "[1, 0.5]",
        '""',
        "x",
        "1e-05",
    ]
    assert plain_text("``logits = W [z_1; ...; z_M] + b``: see\n   :func:`~a.b.c`.") == (
        "logits = W [z_1; ...; z_M] + b: see c."
    )
    assert docstring_summary(_Child).startswith("Options with a #: comment as the fallback")


def _list(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["list", *argv]) == 0
    return capsys.readouterr().out


def test_list_name_shows_every_option_within_80_columns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    for c in registered_components():
        text = _list(capsys, c.name)
        assert text.startswith(f"{c.name} ({c.kind})"), text[:80]
        long = [line for line in text.splitlines() if len(line) > 80]
        assert not long, long
        for option in c.options:
            assert f"  {option.name}: {option.type}" in text.replace("\n      ", " ")
    text = _list(capsys, "mcr")
    assert "options: --method mcr method.OPTION=VALUE" in text
    assert "  lam_ceb: float = 0.0\n      weight of L_CEB (lib); 0 disables it" in text
    assert "  ceb_hidden: int | null = null\n" in text
    cremad = _list(capsys, "cremad")
    assert (
        "preparation: mmbalance prepare cremad --OPTION VALUE" in cremad
        and "  --image-size: int = 112" in cremad
    )
    assert "train defaults (your values win)" in _list(capsys, "synthetic")
    assert "  epochs: int = 30\n      training epochs" in _list(capsys, "train")


def test_list_unknown_name_is_one_line_with_exit_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list", "ogm-ge"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmbalance: error: 'ogm-ge' is no method")
    assert "did you mean ogm_ge" in err and "`mmbalance list` names them all" in err
    assert main(["list", "zzzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_list_prints_docstring_text_without_losing_brackets_to_markup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _list(capsys)
    assert "logits = W [z_1; ...; z_M] + b" in text  # rich would print "logits = W  + b"
    assert "sigmoid(W_g [z_others])" in text
    assert "`mmbalance list NAME` shows the options of one of them" in text
    assert "[z_1; ...; z_M]" in _list(capsys, "concat_linear")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_train_and_compare_help_point_to_list_and_show_the_key_forms(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    for form in (
        "method.OPTION=VALUE",
        "dataset.OPTION=VALUE",
        "encoder.MODALITY.OPTION=VALUE",
        "train.OPTION=VALUE",
        "mmbalance list NAME",
        "mmbalance list train",
    ):
        assert form in text, form
    assert max(len(line) for line in text.splitlines()) <= 80
