"""Name -> factory registries.

Methods, datasets, encoders and fusion heads are looked up by name through a :class:`Registry`
instead of if-chains, so adding one is a single decorated class in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mmbalance.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to objects (usually classes) of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; names are unique."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise a one-line error listing the valid names."""
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items))
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
