"""Distillation methods, registered by name in `METHODS` (the strings of `method.name` in configs).

Each module of this package defines one method: its options (the ``method:`` section of a config), its heads and
its loss terms. Importing the package imports every module in it, which registers them all: adding a method is
adding a file.
"""
import importlib
import pkgutil

from ctkd.methods.base import METHODS, Method, MethodSetup, Stage, StepContext, StepOutput, TeacherOutput

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "MethodSetup", "Stage", "StepContext", "StepOutput", "TeacherOutput"]
