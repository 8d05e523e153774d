"""A fixed τ: vanilla KD's temperature (default 4); no parameters, so no curriculum applies."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctkd.options import TemperatureOptions, spec

from .base import TEMPERATURES


@TEMPERATURES.register("fixed")
class FixedTemperature(nn.Module):
    """A constant τ (vanilla KD, default 4); no parameters, so the curriculum has no effect."""

    @dataclass(frozen=True)
    class Options(TemperatureOptions):
        """A fixed τ has its value and nothing else (a curriculum does not apply to it)."""

        name: str = "fixed"
        value: float = spec(4.0, gt=0)  # τ

    def __init__(self, value: float = 4.0) -> None:
        super().__init__()
        if value <= 0:
            raise ValueError(f"a fixed temperature must be > 0, got {value}")
        self.register_buffer("value", torch.tensor(float(value)), persistent=False)

    @classmethod
    def from_config(cls, cfg: Options, *, num_classes: int) -> FixedTemperature:
        """Build from the config's temperature section."""
        return cls(cfg.value)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, grl_lambda: float) -> Tensor:
        """Return τ as a 0-d tensor."""
        return self.value
