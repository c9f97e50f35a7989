"""Name -> factory registries.

Methods, datasets, encoders, fusion heads and optimizers are looked up by name through a
:class:`Registry` instead of if-chains, so adding one is a single decorated class in its own
module plus its name in the package's list of built-ins.

A registry knows its built-in names without importing the modules that define them
(``builtins``: name -> module of ``package``), and imports a module only when one of its names
is asked for. So the command line can list names, and reject an unknown one, before torch is
imported; ``tests/test_registries.py`` checks that every list matches what its modules register.

Every name has an *origin*: ``built-in``, the plugin whose import registered it
(:mod:`mmbalance.plugins` imports plugins inside :func:`registering_as`), or the module of the
user's own code that registered it. A name registered twice, a plugin's name equal to a
built-in's included, is a one-line error naming both origins. When a run directory names a
component of a plugin that this command was not given, :func:`expect` leaves a hint that
:meth:`Registry.require` adds to its error (how to pass the plugin), and nothing is imported.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from mmbalance.errors import ConfigError

T = TypeVar("T")

BUILTIN = "built-in"
#: Every registry, so that plugins can be listed and removed across all of them.
_REGISTRIES: list[Registry[Any]] = []
#: The origin of the plugin being imported (innermost last).
_IMPORTING: list[str] = []
#: ``(kind, name) -> hint``: components a run directory names and a plugin that was not passed
#: provides (see :func:`expect`).
_EXPECTED: dict[tuple[str, str], str] = {}


@contextlib.contextmanager
def registering_as(origin: str) -> Iterator[None]:
    """Names registered inside this block get ``origin`` (a plugin being imported)."""
    _IMPORTING.append(origin)
    try:
        yield
    finally:
        _IMPORTING.pop()


def all_registries() -> list[Registry[Any]]:
    """Every registry created so far (methods, datasets, encoders, fusion heads, ...)."""
    return list(_REGISTRIES)


def expect(kind: str, name: str, hint: str) -> None:
    """Remember that ``name`` (a ``kind``) comes from a plugin that was not passed, so that an
    unknown-name error says how to pass it (``hint``) instead of listing the valid names only."""
    _EXPECTED[(kind, name)] = hint


def forget_expected() -> None:
    _EXPECTED.clear()


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
        self._origins: dict[str, str] = {}
        _REGISTRIES.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; names are unique across built-ins,
        plugins and the user's own code (a clash names both origins)."""

        def decorator(obj: T) -> T:
            module = str(getattr(obj, "__module__", "") or "")
            builtin_module = (
                f"{self.package}.{self.builtins[name]}" if name in self.builtins else ""
            )
            ours = module.startswith("mmbalance.")
            if ours and (module == builtin_module or not self.package):
                origin = BUILTIN  # a built-in module, even when a plugin's import loads it
            elif _IMPORTING:
                origin = _IMPORTING[-1]
            else:
                origin = BUILTIN if ours else f"module {module or '?'}"
            if name in self._items or (name in self.builtins and module != builtin_module):
                other = (
                    f"{BUILTIN} ({builtin_module})"
                    if name in self.builtins
                    else self._origins.get(name, "?")
                )
                raise ConfigError(
                    f"{self.kind} {name!r} of {origin} clashes with the {self.kind} {name!r} of "
                    f"{other}; rename one of them"
                )
            self._items[name] = obj
            self._origins[name] = origin
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove a name that is not a built-in (a plugin's, when plugins are unloaded)."""
        if name not in self.builtins:
            self._items.pop(name, None)
            self._origins.pop(name, None)

    def registered_by(self, origin: str) -> list[str]:
        """The names that ``origin`` registered (a plugin's), sorted."""
        return sorted(n for n, o in self._origins.items() if o == origin)

    def reassign(self, old: str, new: str) -> list[str]:
        """Give the names of origin ``old`` the origin ``new`` (a module of the user's own code
        that is then passed as a plugin); returns those names."""
        names = self.registered_by(old)
        for name in names:
            self._origins[name] = new
        return names

    def name_of(self, obj: object) -> str | None:
        """The name ``obj`` is registered under, or None."""
        return next((n for n, value in self._items.items() if value is obj), None)

    def origin(self, name: str) -> str:
        """``built-in``, the plugin (name and file) or the module that registered ``name``."""
        if name in self.builtins:
            return BUILTIN
        self.require(name)
        return self._origins[name]

    def require(self, name: str) -> None:
        """Raise a one-line error listing the valid names unless ``name`` is one (imports
        nothing); for a name of a plugin that a run directory names, say how to pass it."""
        if name not in self._items and name not in self.builtins:
            expected = _EXPECTED.get((self.kind, name))
            if expected:
                raise ConfigError(f"unknown {self.kind} {name!r}: {expected}")
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
