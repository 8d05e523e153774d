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

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def get(self, name: str) -> Callable[..., Any]:
        """The builder registered as `name`; an unknown name raises UnknownNameError listing close matches."""
        if name not in self._builders:
            close = difflib.get_close_matches(name, self._builders, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"Unknown {self.kind} '{name}'.{hint} Registered {self.kind}s: {', '.join(self.names())}"
            )
        return self._builders[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the builder registered as `name` with `kwargs`."""
        return self.get(name)(**kwargs)
