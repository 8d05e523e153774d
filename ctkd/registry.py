"""Name → component registries: the strings users write in configs are the registered names.

One pattern for every kind of component (model, dataset, method, temperature, curriculum): a class or builder is
registered by name with a decorator, and it owns a typed `Options` class (a subclass of its kind's base in
ctkd.options) that its config section is validated against. A class carries its options as a nested `Options`
class; a builder function gets them with ``register(name, options=...)``. Every component lives in a module of its
kind's package, and importing the package imports every module in it (`import_submodules`): adding a component is
adding one file. The registry is the only list of valid names.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ctkd.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(UserError, ValueError):
    """A config names a component that is not registered."""


class Registry:
    """Maps config names to the components of one kind (model, dataset, temperature, ...)."""

    def __init__(self, kind: str, *, with_options: bool = True) -> None:
        """`with_options`: every entry must carry an `Options` class (all kinds but models, whose options are
        their builder's keyword arguments)."""
        self.kind = kind
        self.with_options = with_options
        self._builders: dict[str, Callable[..., Any]] = {}
        # Namespaces resolved on demand (e.g. "timm."): a library's thousand models are never enumerated up front.
        self._prefixes: dict[str, tuple[Callable[[str], Callable[..., Any]], str]] = {}

    def register(self, name: str | None = None, *, options: type | None = None) -> Callable[[F], F]:
        """Decorator registering a component under `name` (default: its ``__name__``); duplicates are an error.

        `options`: the options class of a builder function (a class brings its nested `Options`)."""

        def decorator(builder: F) -> F:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} '{key}' is already registered by {self._builders[key].__module__}")
            if options is not None:
                builder.Options = options  # type: ignore[attr-defined]
            if self.with_options and not isinstance(getattr(builder, "Options", None), type):
                raise TypeError(f"{self.kind} '{key}' ({builder.__module__}) has no Options class: give it a nested "
                                "`Options`, or register it with options=...")
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
        """The component registered as `name`; an unknown name raises UnknownNameError listing close matches."""
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


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of `package` (its ``__path__``), which registers the components they define; modules
    whose names start with an underscore are left to be imported by those that need them."""
    for module in pkgutil.iter_modules(path):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")
