"""Curricula of λ, registered by name in `CURRICULA` (the strings of `curriculum.name` in configs).

Importing the package imports every module in it, which registers them all: adding a curriculum is adding a file.
"""
from ctkd.registry import import_submodules

from .base import CURRICULA, Curriculum, RampOptions, build_curriculum, curriculum_options

import_submodules(__name__, __path__)

__all__ = ["CURRICULA", "Curriculum", "RampOptions", "build_curriculum", "curriculum_options"]
