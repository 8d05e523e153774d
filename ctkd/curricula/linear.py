"""A linear rise of λ over the first E_loops epochs (the ramp the authors' `LinearDecay` meant)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import CURRICULA, Ramp, RampOptions


@CURRICULA.register("linear")
class Linear(Ramp):
    """A linear ramp λ_n = λ_min + (λ_max − λ_min)·min(E_n, E_loops)/E_loops.

    This is the ramp the authors' `LinearDecay` meant; theirs ignores the start value as an offset and stops at
    0.9 of the range (docs/differences.md, Linear curriculum).
    """

    @dataclass(frozen=True)
    class Options(RampOptions):
        """A straight rise."""

        name: str = "linear"

    def __call__(self, epoch: int) -> float:
        low, high = self.options.lambda_min, self.options.lambda_max
        return low + (high - low) * self.progress(epoch)
