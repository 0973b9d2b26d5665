"""A small generic registry with lazy ``"module:attr"`` targets.

Listing and validating never import the heavy backends: an entry carries plain
metadata (task, defaults, ...) and a target string that is imported only by
:meth:`Registry.load`. A name registered twice is an error, and a lookup of an unknown
name says which names exist and suggests the closest one.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Iterator


def suggest(name: str, options: list[str] | tuple[str, ...]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest option, or an empty string."""
    match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def preview(names: Any, n: int = 5) -> str:
    """The first ``n`` of a list of names, and how many more (a class list in a message)."""
    names = list(names)
    head = ", ".join(map(str, names[:n]))
    return head + (f", ... ({len(names) - n} more)" if len(names) > n else "")


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, where its implementation lives, and metadata."""

    name: str
    target: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.meta[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)


class Registry:
    """Name -> :class:`Entry`, one instance per extension point (methods, archs, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: str | None = None, doc: str = "", **meta: Any) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        if target is not None and ":" not in target:
            raise ValueError(f"{self.kind} '{name}': target must be 'module:attr', got {target!r}")
        entry = Entry(name=name, target=target, meta=dict(meta), doc=doc)
        self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        return (f"unknown {self.kind} '{name}'{suggest(name, self.names())}; "
                f"valid: {', '.join(sorted(self.names()))}")

    def load(self, name: str) -> Any:
        """Import and return the implementation behind ``name`` (this is where cost is paid)."""
        entry = self.get(name)
        if entry.target is None:
            raise ValueError(f"{self.kind} '{name}' has no implementation to load")
        return import_target(entry.target)


def import_target(target: str) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute."""
    module, attr = target.split(":", 1)
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
