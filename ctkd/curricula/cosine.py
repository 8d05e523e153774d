"""The paper's curriculum (Eq. 11): λ rises from λ_min to λ_max along half a cosine over the first E_loops epochs."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import CURRICULA, Ramp, RampOptions


@CURRICULA.register("cosine")
class Cosine(Ramp):
    """Eq. 11: λ_n = λ_min + ½(λ_max − λ_min)(1 + cos((1 + min(E_n, E_loops)/E_loops)·π)).

    With the defaults: λ(1) = 0.0245, λ(5) = 0.5, λ(n ≥ 10) = 1.
    """

    @dataclass(frozen=True)
    class Options(RampOptions):
        """The paper's curriculum (Eq. 11)."""

        name: str = "cosine"

    def __call__(self, epoch: int) -> float:
        low, high = self.options.lambda_min, self.options.lambda_max
        return low + 0.5 * (high - low) * (1.0 + math.cos((1.0 + self.progress(epoch)) * math.pi))
