"""Name → builder registries: the strings users write in configs are the registered names."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from ctkd.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(UserError, ValueError):
    """A config names a component that is not registered."""


class Registry:
    """Maps config names to builder callables for one kind of component (model, dataset, temperature, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        # Namespaces resolved on demand (e.g. "timm."): a library's thousand models are never enumerated up front.
        self._prefixes: dict[str, tuple[Callable[[str], Callable[..., Any]], str]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator registering a builder under `name` (default: its ``__name__``); duplicates are an error."""

        def decorator(builder: F) -> F:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(
                    f"{self.kind} '{key}' is already registered by {self._builders[key].__module__}"
                )
            self._builders[key] = builder
            return builder

        return decorator

    def register_prefix(self, prefix: str, resolver: Callable[[str], Callable[..., Any]], shown_as: str) -> None:
        """Resolve every name starting with `prefix` by `resolver(rest)`, which raises UnknownNameError if unknown.

        `shown_as` is how `names()` lists the namespace, e.g. "timm.<any timm model>".
        """
        if prefix in self._prefixes:
            raise ValueError(f"{self.kind} prefix '{prefix}' is already registered")
        self._prefixes[prefix] = (resolver, shown_as)

    def explicit_names(self) -> list[str]:
        """The names registered one by one (no namespaces), sorted: each can be built as it is."""
        return sorted(self._builders)

    def names(self) -> list[str]:
        """All registered names, sorted, then each namespace as its `shown_as` placeholder."""
        return self.explicit_names() + [shown for _, shown in self._prefixes.values()]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except UnknownNameError:
            return False
        return True

    def get(self, name: str) -> Callable[..., Any]:
        """The builder registered as `name`; an unknown name raises UnknownNameError listing close matches."""
        if name in self._builders:
            return self._builders[name]
        for prefix, (resolver, _) in self._prefixes.items():
            if name.startswith(prefix):
                return resolver(name[len(prefix):])
        close = difflib.get_close_matches(name, self._builders, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"Unknown {self.kind} '{name}'.{hint} Registered {self.kind}s: {', '.join(self.names())}"
        )

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the builder registered as `name` with `kwargs`."""
        return self.get(name)(**kwargs)
