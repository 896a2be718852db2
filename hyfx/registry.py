"""Name → object registries (recipes, targets): one lookup, one error that names what exists."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from hyfx.errors import HyfxError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered under names, in registration order; `kind` names them in errors ("recipe", "target")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise HyfxError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
