"""Temperature modules, registered by name in `TEMPERATURES` (the strings of `temperature.name` in configs).

Importing the package imports every module in it, which registers them all: adding a temperature is adding a file.
"""
from ctkd.registry import import_submodules

from .base import (
    TEMPERATURES,
    BoundedTemperature,
    LearnedTemperatureOptions,
    build_temperature,
    gradient_reversal,
    gradient_scale,
    temperature_options,
)

import_submodules(__name__, __path__)

from .fixed import FixedTemperature  # noqa: E402  (registered above; named here for import)
from .global_tau import GlobalTemperature  # noqa: E402
from .instance import InstanceTemperature  # noqa: E402

__all__ = [
    "TEMPERATURES", "BoundedTemperature", "FixedTemperature", "GlobalTemperature", "InstanceTemperature",
    "LearnedTemperatureOptions", "build_temperature", "gradient_reversal", "gradient_scale", "temperature_options",
]
