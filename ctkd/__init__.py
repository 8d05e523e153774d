"""ctkd: Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023) as a research framework.

The model zoo and the datasets live in the repository's top-level `models/` and `datasets/` folders and are the
subpackages `ctkd.models` and `ctkd.datasets`: an install puts them there (pyproject.toml's package-dir), so it adds
no top-level `models` or `datasets` that would hide another library's (Hugging Face's `datasets`); run from a
checkout, `_CheckoutPackages` below maps the two names onto the folders.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parent.parent
_FOLDERS = ("models", "datasets")  # ctkd.<name> ← <checkout>/<name>


class _CheckoutPackages(importlib.abc.MetaPathFinder):
    """Finds `ctkd.models` and `ctkd.datasets` in a checkout's top-level folders (their submodules are then found
    through the package's __path__ as usual)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The spec of ctkd.models or ctkd.datasets from the checkout's folder; None for any other name."""
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in _FOLDERS:
            return None
        folder = _CHECKOUT / name
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if not (Path(__file__).resolve().parent / "models").is_dir() and (_CHECKOUT / "models" / "__init__.py").is_file():
    sys.meta_path.append(_CheckoutPackages())  # a checkout (an install has ctkd/models itself)
