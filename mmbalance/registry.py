"""Name -> factory registries.

Methods, datasets, encoders, fusion heads and optimizers are looked up by name through a
:class:`Registry` instead of if-chains, so adding one is a single decorated class in its own
module plus its name in the package's list of built-ins.

A registry knows its built-in names without importing the modules that define them
(``builtins``: name -> module of ``package``), and imports a module only when one of its names
is asked for. So the command line can list names, and reject an unknown one, before torch is
imported; ``tests/test_registries.py`` checks that every list matches what its modules register.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from mmbalance.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to objects (usually classes) of one kind.

    Args:
        kind: what the names are ("method", "dataset"...), for messages.
        package: the package whose modules register the built-ins.
        builtins: built-in name -> module (relative to ``package``) that registers it.
    """

    def __init__(
        self, kind: str, package: str = "", builtins: Mapping[str, str] | None = None
    ) -> None:
        self.kind = kind
        self.package = package
        self.builtins = dict(builtins or {})
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; names are unique."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def require(self, name: str) -> None:
        """Raise a one-line error listing the valid names unless ``name`` is one (imports
        nothing)."""
        if name not in self._items and name not in self.builtins:
            valid = ", ".join(self.names())
            close = difflib.get_close_matches(name, self.names(), n=2)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}; {hint}valid {self.kind}s: {valid}")

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` (importing its module if it is a built-in
        not loaded yet) or raise a one-line error listing the valid names."""
        if name not in self._items:
            self.require(name)
            self._load(name)
        return self._items[name]

    def _load(self, name: str) -> None:
        module = f"{self.package}.{self.builtins[name]}"
        importlib.import_module(module)
        if name not in self._items:
            raise RuntimeError(f"{module} does not register the {self.kind} {name!r}")

    def load_all(self) -> None:
        """Import every built-in's module."""
        for name in self.builtins:
            if name not in self._items:
                self._load(name)

    def names(self) -> list[str]:
        return sorted(self._items.keys() | self.builtins.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.builtins

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        self.load_all()
        return sorted(self._items.items())


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module-level ``__getattr__``: each public name in ``exports`` (name -> module
    of ``package``) is imported from its module on first use, so that importing the package (for
    its registry) imports nothing heavy, torch included."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
