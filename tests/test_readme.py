"""The README's main command names a comparison that runs: every method spec resolves to a valid
configuration on its dataset (a method that would never act there is refused at resolution, so
this catches it without training)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mmbalance.builder import resolve_config
from mmbalance.compare import parse_method_spec, split_methods

README = Path(__file__).resolve().parents[1] / "README.md"


def _main_command() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- main-command -->\s*```\s*\n(.*?)\n```", text, re.S)
    assert block, "README.md has no main command block"
    command = block.group(1).split("&&", 1)[1]
    return shlex.split(command)


def test_main_command_compares_methods_that_resolve_on_its_dataset() -> None:
    argv = _main_command()
    assert argv[:2] == ["mmbalance", "compare"]
    options = dict(zip(argv[2::2], argv[3::2], strict=False))
    dataset, methods = options["--dataset"], split_methods(options["--methods"])
    assert len(methods) >= 5 and int(options["--seeds"]) >= 3
    for spec in methods:
        name, params = parse_method_spec(spec)
        overrides = {"dataset": dataset, "method": name}
        overrides |= {f"method.{k}": v for k, v in (params or {}).items()}
        assert resolve_config(overrides).method.name == name


def test_the_your_data_python_example_runs(tmp_path: Path, monkeypatch, restore_registries) -> None:
    """The README's "Your data" Python block, as written but one seed of one epoch."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- your-data-python -->\s*```python\n(.*?)\n```", text, re.S)
    assert block, "README.md has no your-data-python block"
    code = block.group(1)
    smaller = code.replace("seeds=2", "seeds=1").replace('"train.epochs": 5', '"train.epochs": 1')
    assert smaller != code
    monkeypatch.chdir(tmp_path)
    exec(compile(smaller, "README.md", "exec"), {"__name__": "readme_example"})
    results = (tmp_path / "runs" / "mine" / "results.json").read_text()
    assert "ogm_ge" in {r["method"] for r in json.loads(results)}
    assert (tmp_path / "runs" / "mine" / "report.html").is_file()
