"""Inspection from the command line: ``python -m ctkd list models|methods|temperatures|curricula|datasets``."""
from __future__ import annotations

import argparse
import importlib

from ctkd.cli import exit_with
from ctkd.registry import Registry

# the registries a user can list, by the plural a config reader would type: (module, registry attribute); each is
# imported only when listed (importing a package registers what is in it)
REGISTRIES: dict[str, tuple[str, str]] = {
    "models": ("ctkd.models", "MODELS"),
    "methods": ("ctkd.methods", "METHODS"),
    "temperatures": ("ctkd.temperatures", "TEMPERATURES"),
    "curricula": ("ctkd.curricula", "CURRICULA"),
    "datasets": ("ctkd.datasets", "DATASETS"),
}


def registry(kind: str) -> Registry:
    """The registry of `kind`, its package imported (which registers its components)."""
    module, attribute = REGISTRIES[kind]
    return getattr(importlib.import_module(module), attribute)


def main(argv: list[str] | None = None) -> int:
    """`list KIND`: print the registered names of KIND, one per line (the strings configs accept)."""
    parser = argparse.ArgumentParser(prog="python -m ctkd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the registered names of a component kind")
    listing.add_argument("kind", choices=sorted(REGISTRIES), help="what to list")
    args = parser.parse_args(argv)
    print("\n".join(described(args.kind)))
    return 0


def described(kind: str) -> list[str]:
    """The registered names of `kind`, one per line; a method's line adds its paper and what it needs."""
    names = registry(kind).names()
    if kind != "methods":
        return names
    width = max(len(name) for name in names) + 2
    lines = []
    for name in names:
        method = registry(kind).get(name)
        lines.append(f"{name:<{width}}{method.paper or '-':<36}needs {method.needs()}")
    return lines


if __name__ == "__main__":
    exit_with(main)
