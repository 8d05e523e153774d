"""Distillation methods, registered by name in `METHODS` (the strings of `method.name` in configs).

Each module of this package defines one method: its options (the ``method:`` section of a config), its heads and
its loss terms. Importing the package imports every module in it, which registers them all: adding a method is
adding a file.
"""
from ctkd.registry import import_submodules

from .base import METHODS, Method, MethodSetup, Stage, StepContext, StepOutput, TeacherOutput

import_submodules(__name__, __path__)

__all__ = ["METHODS", "Method", "MethodSetup", "Stage", "StepContext", "StepOutput", "TeacherOutput"]
