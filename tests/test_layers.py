"""The import layers of docs/architecture.md hold: no module imports one above it, not even
inside a function, and every module of the package belongs to a layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmbalance"

#: Layers from the top; a module may import modules of its own layer and of every layer below.
LAYERS: list[tuple[str, ...]] = [
    ("cli", "api", "__main__", "lightning"),
    ("compare", "diagnose"),
    ("report",),
    ("train",),
    ("builder",),
    ("eval",),
    ("methods",),
    ("models", "data", "optim"),
    ("config", "registry", "errors", "io", "plugins"),
]
#: Units of one layer that must not import each other.
APART = {frozenset({"models", "data"})}


def unit_of(module: str) -> str:
    """``mmbalance.train.loop`` -> ``train``; ``mmbalance.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"mmbalance.{unit} belongs to no layer of docs/architecture.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``name`` (``mmbalance.methods.mlb``) is a module or package of ours."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Every ``mmbalance`` module ``path`` imports, anywhere in the file, with its line."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno))
            # ``from mmbalance import data`` imports the subpackage, ``from mmbalance.methods
            # import mlb`` the module
            found += [
                (f"{base}.{a.name}", node.lineno)
                for a in node.names
                if is_module(f"{base}.{a.name}")
            ]
    return [(m, line) for m, line in found if m == "mmbalance" or m.startswith("mmbalance.")]


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = unit_of(module_name(path))
        if not here:  # mmbalance/__init__.py: the package's front door
            continue
        for target, line in imported_modules(path):
            there = unit_of(target)
            if not there or there == here:
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if rank(there) < rank(here):
                out.append(f"{where} imports {target} from a layer above")
            elif rank(there) == rank(here) and frozenset({here, there}) in APART:
                out.append(f"{where} imports {target} across its layer")
    return out


def test_every_module_belongs_to_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of(module_name(path))
        if unit:
            rank(unit)


def test_no_module_imports_a_layer_above_it() -> None:
    assert violations() == []


def test_the_checker_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    source = "def f():\n    from mmbalance.cli import main\n\nfrom ..compare import x\n"
    fake = PACKAGE / "eval" / "_layer_probe.py"
    fake.write_text(source)
    try:
        found = [m for m, _ in imported_modules(fake)]
    finally:
        fake.unlink()
    assert sorted(found) == ["mmbalance.cli", "mmbalance.compare"]


def method_file_imports() -> list[str]:
    """Imports of one method file by another (methods share pieces through methods/ops/)."""
    from mmbalance.methods import BUILTIN_METHODS

    modules = {f"mmbalance.methods.{name}" for name in BUILTIN_METHODS.values()}
    out = []
    for module in sorted(modules):
        path = PACKAGE / "methods" / f"{module.rpartition('.')[2]}.py"
        for target, line in imported_modules(path):
            if target in modules and target != module:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return out


def test_no_method_file_imports_another_method_file() -> None:
    assert method_file_imports() == []


def test_the_method_file_check_sees_an_import_of_another_method(tmp_path: Path) -> None:
    fake = PACKAGE / "methods" / "_method_probe.py"
    fake.write_text("from mmbalance.methods import mlb\nfrom mmbalance.methods.ogm import OGM\n")
    try:
        found = [m for m, _ in imported_modules(fake)]
    finally:
        fake.unlink()
    assert {"mmbalance.methods.mlb", "mmbalance.methods.ogm"} <= set(found)
