"""Small plug-in registries in the style of timm's model registry.

A decorator registers a factory under its name; ``create(name, **kw)`` builds it and fails
with the list of valid names; ``list(pattern)`` queries with shell-style wildcards.

    TEACHERS = Registry("teacher")

    @TEACHERS.register("effnet_lite0_imagenet")
    def effnet_lite0_imagenet(**kw): ...

    TEACHERS.create("effnet_lite0_imagenet")

An entry may also stand for a family of names written ``entry:argument`` (``open_clip:ViT-B-32/openai``):
``resolve(name)`` returns the entry and the argument after its colon.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Generic, TypeVar

from vitdistill.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            return fn

        return deco

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def resolve(self, name: str) -> tuple[str, str | None]:
        """``"entry"`` -> ``("entry", None)``; ``"entry:rest"`` -> ``("entry", "rest")`` when ``entry`` is registered."""
        if name in self._entries:
            return name, None
        prefix, sep, rest = name.partition(":")
        if sep and prefix in self._entries:
            return prefix, rest
        raise RegistryError(self.unknown_message(name))

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def unknown_message(self, name: str, extra: str = "") -> str:
        valid = ", ".join(self.list()) or "(none registered)"
        close = difflib.get_close_matches(name, self.list(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; valid {self.kind}s: {valid}{extra}"
