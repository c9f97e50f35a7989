"""The documentation site: ``mkdocs build --strict`` succeeds (a reference that does not resolve,
a broken link or a missing README section fails it), every registered method has its page with
its docstring and options, and the command reference is the parser's own help."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmbalance.cli import build_parser, registered_components
from mmbalance.config import docstring_summary, plain_text
from mmbalance.methods import METHODS, Method

pytest.importorskip("mkdocstrings_handlers.python")
ROOT = Path(__file__).resolve().parents[1]


def _docs_site():
    spec = importlib.util.spec_from_file_location("docs_site", ROOT / "scripts" / "docs_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(page: Path) -> str:
    """A built page's visible text, whitespace collapsed."""
    raw = re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))
    return " ".join(html.unescape(raw).split())


@pytest.mark.timeout(900)
def test_site_builds_strict_with_a_page_per_method_and_the_parsers_help(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    components = {c.name: c for c in registered_components() if c.kind == "method"}
    for name in METHODS.names():
        page = site / "methods" / name / "index.html"
        assert page.is_file(), name
        text = _text(page)
        # the class docstring's opening (as written, roles shown as code) and every option
        summary = plain_text(docstring_summary(METHODS.get(name)))
        assert "".join(summary.split()[:8]) in "".join(text.split()), name
        for option in components[name].options:
            assert option.name in text, (name, option.name)

    cli = _text(site / "reference" / "cli" / "index.html")
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name, command in sub.choices.items():
        assert f"usage: mmbalance {name}" in cli, name
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in cli, (name, flag)

    start = _text(site / "getting-started" / "index.html")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    main_command = re.search(r"<!-- main-command -->\s*```\s*\n(.*?)\n```", readme, re.S)
    assert " ".join(main_command.group(1).split()) in start
    assert (site / "results" / "index.html").is_file()
    assert (site / "your_data" / "index.html").is_file()


def test_a_newly_registered_method_gets_its_page() -> None:
    @dataclass
    class ScaledParams:
        """Options.

        Attributes:
            gain: the factor every loss is multiplied by.
        """

        gain: float = 2.0

    class Scaled(Method):
        """Scaled losses: ``L = gain * CE`` (no official code; a test's method)."""

        Params = ScaledParams

    METHODS.register("scaled_test")(Scaled)
    try:
        pages = _docs_site().method_pages()
    finally:
        METHODS.unregister("scaled_test")
    page = pages["methods/scaled_test.md"]
    assert f"::: {Scaled.__module__}.{Scaled.__qualname__}" in page
    assert re.search(r"\| `gain` \| float \| `2.0` \| the factor every loss is multiplied by", page)
    assert "[`scaled_test`](scaled_test.md)" in pages["methods/index.md"]


def test_readme_links_become_site_links_and_a_missing_section_is_an_error() -> None:
    site = _docs_site()
    text = "# t\nintro\n## A\nsee [the results](docs/results.md), [`x.py`](benchmarks/x.py)\n"
    page = site.readme_page("Page", ["A"], text)
    assert "[the results](results.md)" in page and "`x.py`" in page
    assert "benchmarks/x.py)" not in page
    with pytest.raises(KeyError, match="no section '## B'"):
        site.readme_page("Page", ["B"], text)
