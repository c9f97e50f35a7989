"""The documentation site's generated pages: a MkDocs hook (``hooks:`` in ``mkdocs.yml``) and a
griffe extension for mkdocstrings.

Pages that would go stale if written by hand are made at build time from what they describe:

- one page per registered method (``methods/<name>.md``), from the method's class and module
  docstrings (its formula and its departures from the official code) and its ``Params`` (the
  option table of ``mmbalance list NAME``), so that a new method has a page once it registers;
- the datasets, encoders, fusion heads and training settings, from the same registries;
- the command line, from the argument parser of ``mmbalance``;
- the pages that show the README's sections (its introduction, set-up, the command line, the
  Python API, how a method plugs in, the results, the layout), included from ``README.md`` so that one text serves both.

Everything is imported from the package, so the site documents the code it is built with;
``mkdocs build --strict`` fails on a reference that does not resolve (``tests/test_docs.py``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: README sections shown on the site, each as (page, title, sections of the README).
README_PAGES: list[tuple[str, str, list[str]]] = [
    ("getting-started.md", "Getting started", ["Set-up", "Python"]),
    ("command-line.md", "The command line", ["Command line"]),
    ("results-summary.md", "Results at a glance", ["Results"]),
    ("layout.md", "Layout", ["Layout"]),
]

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


# --- the README's sections ----------------------------------------------------------------------
def readme_sections(text: str | None = None) -> dict[str, str]:
    """The README's ``## `` sections by title (the text before the first one as ``""``)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    out = {"": parts[0]}
    out |= {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}
    return out


def site_links(markdown: str) -> str:
    """Links of README text as the site needs them: ``docs/X`` points to the site's page or file
    ``X``; a link to another file of the repository (a script, an example) becomes the path in
    code, since the site does not carry it; web links and anchors stay."""

    def fix(m: re.Match[str]) -> str:
        bang, text, target = m.groups()
        if re.match(r"[a-z]+:|#", target):
            return m.group(0)
        if target.startswith("docs/"):
            return f"{bang}[{text}]({target.removeprefix('docs/')})"
        return text if text.startswith("`") else f"`{target}`"

    return _LINK.sub(fix, markdown)


def readme_page(title: str, sections: Iterable[str], text: str | None = None) -> str:
    """A page of the README's ``sections`` under ``title`` (each section one level down)."""
    found = readme_sections(text)
    body = [f"# {title}\n"]
    for name in sections:
        if name not in found:
            raise KeyError(f"README.md has no section '## {name}' for the site's page {title!r}")
        body.append(f"## {name}\n{site_links(found[name])}")
    return "\n".join(body)


# --- registered components ----------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options_table(options: Iterable[Any]) -> str:
    """A Markdown table of :class:`mmbalance.config.OptionDoc` rows."""
    from mmbalance.config import value_text

    rows = ["| option | type | default | what |", "|---|---|---|---|"]
    for o in options:
        default = "required" if o.required else f"`{value_text(o.default)}`"
        rows.append(f"| `{o.name}` | {_cell(o.type)} | {_cell(default)} | {_cell(o.help or '')} |")
    return "\n".join(rows) if len(rows) > 2 else "No options."


def _directive(path: str, **options: Any) -> str:
    lines = [f"::: {path}", "    options:"]
    lines += [
        f"      {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()
    ]
    return "\n".join(lines)


def _object_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def method_pages() -> dict[str, str]:
    """``methods/index.md`` and one page per registered method."""
    from mmbalance.cli import registered_components
    from mmbalance.methods import METHODS

    components = {c.name: c for c in registered_components() if c.kind == "method"}
    index = [
        "# Methods\n",
        "Every method the library registers, with its options, its formula and where it follows "
        "or departs from its official code. `mmbalance list NAME` prints the same options.\n",
        "| method | what it does |",
        "|---|---|",
    ]
    pages: dict[str, str] = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        component = components[name]
        index.append(f"| [`{name}`]({name}.md) | {_cell(component.summary)} |")
        module = cls.__module__
        pages[f"methods/{name}.md"] = "\n".join(
            [
                f"# `{name}`\n",
                "```",
                f"mmbalance train --dataset synthetic --method {name} method.OPTION=VALUE",
                f"mmbalance list {name}",
                "```\n",
                _directive(
                    _object_path(cls),
                    show_root_heading=False,
                    show_root_toc_entry=False,
                    members=False,
                    show_bases=False,
                ),
                f"\n## Options\n\n`{component.usage}`\n",
                options_table(component.options),
                f"\n## Its module (`{module}`)\n",
                _directive(
                    module, show_root_heading=False, show_root_toc_entry=False, members=False
                ),
                "",
            ]
        )
    return {"methods/index.md": "\n".join(index) + "\n", **pages}


def component_pages() -> dict[str, str]:
    """The datasets, the encoders and fusion heads, and the training settings."""
    from mmbalance.cli import registered_components

    components = registered_components()
    pages: dict[str, str] = {}
    kinds = [
        ("reference/datasets.md", "Datasets", ("dataset",)),
        ("reference/models.md", "Encoders and fusion heads", ("encoder", "fusion head")),
        ("reference/training.md", "Training settings", ("training settings",)),
    ]
    for path, title, wanted in kinds:
        body = [f"# {title}\n"]
        for c in (c for c in components if c.kind in wanted):
            body.append(f"## `{c.name}` ({c.kind})\n\n{c.summary}\n")
            body += [f"{note}\n" for note in c.notes]
            body.append(f"`{c.usage}`\n\n{options_table(c.options)}\n")
            for extra_title, usage, options in c.extra:
                body.append(f"**{extra_title}**: `{usage}`\n\n{options_table(options)}\n")
        pages[path] = "\n".join(body)
    return pages


# --- the command line ---------------------------------------------------------------------------
def cli_page(width: int = 100) -> str:
    """``mmbalance --help`` and every subcommand's help, from the parser itself."""
    from mmbalance.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal's width
    try:
        parser = build_parser()
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        body = [
            "# Command reference\n",
            "The help of `mmbalance` and of each of its commands, as they print it "
            "(`mmbalance COMMAND --help`). [The command line](../command-line.md) explains them "
            "with examples.\n",
            "## `mmbalance`\n",
            f"```text\n{parser.format_help().rstrip()}\n```\n",
        ]
        for name, command in sub.choices.items():
            body.append(f"## `mmbalance {name}`\n")
            body.append(f"```text\n{command.format_help().rstrip()}\n```\n")
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(body)


# --- the Python API -----------------------------------------------------------------------------
def api_pages() -> dict[str, str]:
    """The hooks a method implements and the Python entry points, by the objects' own paths (so
    a module that moves keeps its page)."""
    from mmbalance.build import resolve_config
    from mmbalance.methods import EpochContext, Method, MethodAdapter, ModelInfo, StepContext
    from mmbalance.train import Callback, fit
    from mmbalance.train.loop import RunResult, Trainer

    readme = readme_sections()
    hooks = [
        "# How a method plugs in\n",
        site_links(readme["How a method plugs in"]),
        "\n## The hooks\n",
        _directive(_object_path(Method), members_order="source", show_bases=False),
    ]
    hooks += [
        f"\n{_directive(_object_path(obj), members_order='source')}"
        for obj in (StepContext, EpochContext, ModelInfo, MethodAdapter)
    ]
    api = ["# Python API\n"]
    api += [
        f"\n{_directive(_object_path(obj), members_order='source')}"
        for obj in (resolve_config, fit, RunResult, Trainer, Callback)
    ]
    callbacks = Callback.__module__.rsplit(".", 1)[0] + ".callbacks"
    api.append(f"\n{_directive(callbacks, members_order='source', show_root_heading=True)}")
    return {"hooks.md": "\n".join(hooks) + "\n", "python-api.md": "\n".join(api) + "\n"}


def generated_pages() -> dict[str, str]:
    """Every generated page: its path under the site's ``docs/`` and its Markdown."""
    pages = {
        "index.md": "# mmbalance\n" + site_links(readme_sections()[""].split("\n", 1)[1]),
        **{path: readme_page(title, sections) for path, title, sections in README_PAGES},
        **method_pages(),
        **component_pages(),
        **api_pages(),
        "reference/cli.md": cli_page(),
    }
    return pages


def site_nav(pages: Iterable[str]) -> list[Any]:
    """The site's navigation: the guides, the methods, the reference, the results."""
    methods = sorted(p for p in pages if p.startswith("methods/") and p != "methods/index.md")
    return [
        {"Home": "index.md"},
        {"Getting started": "getting-started.md"},
        {"Your data": "your_data.md"},
        {"The command line": "command-line.md"},
        {"How a method plugs in": "hooks.md"},
        {"Methods": ["methods/index.md", *methods]},
        {
            "Reference": [
                {"Command reference": "reference/cli.md"},
                {"Python API": "python-api.md"},
                {"Datasets": "reference/datasets.md"},
                {"Encoders and fusion heads": "reference/models.md"},
                {"Training settings": "reference/training.md"},
                {"Architecture": "architecture.md"},
                {"Layout": "layout.md"},
            ]
        },
        {"Results": [{"At a glance": "results-summary.md"}, {"All studies": "results.md"}]},
    ]


# --- MkDocs hooks -------------------------------------------------------------------------------
_PAGES: dict[str, str] = {}


def on_config(config: Any) -> Any:
    _PAGES.clear()
    _PAGES.update(generated_pages())
    config["nav"] = site_nav(_PAGES)
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, content in _PAGES.items():
        files.append(File.generated(config, path, content=content))
    return files


# --- mkdocstrings: reStructuredText roles as code -----------------------------------------------
try:
    import griffe
except ImportError:  # the hook alone needs no griffe; mkdocstrings brings it
    griffe = None  # type: ignore[assignment]

if griffe is not None:

    class SphinxRoles(griffe.Extension):
        """Docstrings write ``:class:`~mmbalance.x.Y``` (as ``mmbalance list`` reads them);
        the site shows the name as code: ``Y`` with ``~``, else the whole path."""

        def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(
                    lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`",
                    obj.docstring.value,
                )
