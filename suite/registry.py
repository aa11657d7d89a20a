"""One generic registry: string ids -> classes, with base-class checks and did-you-mean.

Names stored in YAML, records and CSVs are registry ids, never import paths.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from suite.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps stable string ids to registered objects of one kind.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register("rtn")
        ... class RTN: ...
    """

    def __init__(self, kind: str, base: type | None = None,
                 loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.base = base
        self._items: dict[str, T] = {}
        self._loader = loader  # imports the built-in entries on first lookup

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name raises."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"{self.kind} {name!r} must subclass {self.base.__name__}")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, field: str | None = None) -> T:
        """Return the object for ``name`` or raise a one-line ConfigError with suggestions."""
        self._load()
        if name in self._items:
            return self._items[name]
        raise ConfigError(self.unknown_message(name, field))

    def unknown_message(self, name: str, field: str | None = None) -> str:
        """One-line message for an unknown id: field, did-you-mean, accepted values."""
        self._load()
        close = suggest(str(name), list(self._items))
        hint = f" (did you mean {close!r}?)" if close else ""
        where = f"{field}: " if field else ""
        return (
            f"{where}unknown {self.kind} {name!r}{hint}; accepted: {', '.join(sorted(self._items))}"
        )

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        """Registered (name, object) pairs sorted by name."""
        self._load()
        return sorted(self._items.items())


def suggest(name: str, choices: list[str]) -> str | None:
    """The closest of ``choices`` to a mistyped ``name``: a near spelling, else the only
    choice that ``name`` abbreviates (``smollm2`` for ``smollm2-135m-instruct@gguf-q4_1``)."""
    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        return close[0]
    prefixed = [c for c in choices if name and c.lower().startswith(name.lower())]
    return prefixed[0] if len(prefixed) == 1 else None
