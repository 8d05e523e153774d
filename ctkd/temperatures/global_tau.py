"""Global-T (Fig. 2a of the paper): one learnable τ shared by every sample, trained through the reversal."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import TEMPERATURES, BoundedTemperature, LearnedTemperatureOptions


@TEMPERATURES.register("global")
class GlobalTemperature(BoundedTemperature):
    """Global-T (Fig. 2a of the paper): one learnable raw scalar shared by every sample.

    ``init_raw`` = 1.0 as in the authors' code, so τ₀ = 1 + 20·sigmoid(1) ≈ 15.62 with the default range.
    """

    @dataclass(frozen=True)
    class Options(LearnedTemperatureOptions):
        """Global-T: the shared options and the raw value it starts from."""

        name: str = "global"
        init_raw: float = 1.0  # initial raw value (τ₀ = 1 + 20 · σ(1) ≈ 15.62)

    def __init__(
        self, t_start: float = 1.0, t_range: float = 20.0, init_raw: float = 1.0, adversarial: bool = True
    ) -> None:
        super().__init__(t_start, t_range, adversarial)
        self.raw = nn.Parameter(torch.tensor(float(init_raw)))

    @classmethod
    def from_config(cls, cfg: Options, *, num_classes: int) -> GlobalTemperature:
        """Build from the config's temperature section."""
        return cls(cfg.t_start, cfg.t_range, cfg.init_raw, cfg.adversarial)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, grl_lambda: float) -> Tensor:
        """Return τ as a 0-d tensor; the logits are not used."""
        return self.bound(self.raw, grl_lambda)
