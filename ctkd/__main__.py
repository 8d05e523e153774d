"""Inspection from the command line: ``python -m ctkd list models|methods|temperatures|curricula|datasets``."""
from __future__ import annotations

import argparse
import sys

from ctkd.registry import Registry


def registries() -> dict[str, Registry]:
    """The registries a user can list, by the plural a config reader would type (imports register everything)."""
    from ctkd import datasets, models
    from ctkd.curriculum import CURRICULA
    from ctkd.methods import METHODS
    from ctkd.temperature import TEMPERATURES

    return {
        "models": models.MODELS,
        "methods": METHODS,
        "temperatures": TEMPERATURES,
        "curricula": CURRICULA,
        "datasets": datasets.DATASETS,
    }


def main(argv: list[str] | None = None) -> int:
    """`list KIND`: print the registered names of KIND, one per line (the strings configs accept)."""
    kinds = registries()
    parser = argparse.ArgumentParser(prog="python -m ctkd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the registered names of a component kind")
    listing.add_argument("kind", choices=sorted(kinds), help="what to list")
    args = parser.parse_args(argv)
    print("\n".join(kinds[args.kind].names()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
