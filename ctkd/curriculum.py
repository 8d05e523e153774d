"""The curriculum on λ, the strength of the gradient reversal (Eqs. 9-11 of the paper; docs/method.md, Curriculum).

λ is a pure function of the epoch, set once per epoch (never per iteration) with epochs counted from 1 as in the
authors' code (docs/method.md, Curriculum (Eq. 11)), so resuming needs nothing but the epoch number. Each curriculum
owns its options (the ``curriculum:`` section, selected by ``curriculum.name``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ctkd.config import CurriculumConfig
from ctkd.registry import Registry
from ctkd.schema import _spec

CURRICULA = Registry("curriculum")

Curriculum = Callable[[int], float]


@dataclass(frozen=True)
class RampOptions(CurriculumConfig):
    """A rise of λ from `lambda_min` to `lambda_max` over the first `loops` epochs."""

    lambda_min: float = _spec(0.0, ge=0)  # λ at the start of the curriculum
    lambda_max: float = _spec(1.0, ge=0)  # λ at the end of the curriculum
    loops: int = _spec(10, ge=1)  # E_loops: number of epochs over which λ rises from lambda_min to lambda_max

    def problems(self) -> list[tuple[str, str]]:
        """λ must rise."""
        if self.lambda_max >= self.lambda_min:
            return []
        return [("lambda_max", f"'curriculum.lambda_max' ({self.lambda_max}) must be >= 'curriculum.lambda_min' "
                               f"({self.lambda_min}); raise lambda_max or lower lambda_min")]


class _Ramp:
    """Base of the ramps: the fraction of the rise done after an epoch."""

    def __init__(self, options: RampOptions) -> None:
        if options.problems():
            raise ValueError(options.problems()[0][1])
        self.options = options

    def progress(self, epoch: int) -> float:
        """Fraction of the ramp done after `epoch` (1-based), clipped to [0, 1]."""
        return min(max(epoch, 0), self.options.loops) / self.options.loops


@CURRICULA.register("cosine")
class Cosine(_Ramp):
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


@CURRICULA.register("linear")
class Linear(_Ramp):
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


@CURRICULA.register("constant")
class Constant:
    """No curriculum: λ = λ_max from the first epoch (for ablations)."""

    @dataclass(frozen=True)
    class Options(CurriculumConfig):
        """A constant λ has its value and nothing else."""

        name: str = "constant"
        lambda_max: float = _spec(1.0, ge=0)  # λ in every epoch

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, epoch: int) -> float:
        return self.options.lambda_max


def build_curriculum(options: CurriculumConfig) -> Curriculum:
    """The λ schedule of the config's curriculum section, as a function epoch (1-based) → λ ≥ 0."""
    return CURRICULA.get(options.name)(options)


def curriculum_options(name: str, **values: object) -> CurriculumConfig:
    """The options of the curriculum registered as `name` with `values` (the rest at their defaults)."""
    return CURRICULA.get(name).Options(**values)
