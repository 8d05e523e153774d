"""What every curriculum of λ shares (Eqs. 9-11 of the paper; docs/method.md, Curriculum): the registry and the ramp.

λ, the strength of the gradient reversal, is a pure function of the epoch, set once per epoch (never per iteration)
with epochs counted from 1 as in the authors' code (docs/method.md, Curriculum (Eq. 11)), so resuming needs nothing
but the epoch number. Each curriculum is a module of this package and owns its options (the ``curriculum:`` section,
selected by ``curriculum.name``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ctkd.options import CurriculumOptions, spec
from ctkd.registry import Registry

CURRICULA = Registry("curriculum")

Curriculum = Callable[[int], float]


@dataclass(frozen=True)
class RampOptions(CurriculumOptions):
    """A rise of λ from `lambda_min` to `lambda_max` over the first `loops` epochs."""

    lambda_min: float = spec(0.0, ge=0)  # λ at the start of the curriculum
    lambda_max: float = spec(1.0, ge=0)  # λ at the end of the curriculum
    loops: int = spec(10, ge=1)  # E_loops: number of epochs over which λ rises from lambda_min to lambda_max

    def problems(self) -> list[tuple[str, str]]:
        """λ must rise."""
        if self.lambda_max >= self.lambda_min:
            return []
        return [("lambda_max", f"'curriculum.lambda_max' ({self.lambda_max}) must be >= 'curriculum.lambda_min' "
                               f"({self.lambda_min}); raise lambda_max or lower lambda_min")]


class Ramp:
    """Base of the ramps: the fraction of the rise done after an epoch."""

    def __init__(self, options: RampOptions) -> None:
        if options.problems():
            raise ValueError(options.problems()[0][1])
        self.options = options

    def progress(self, epoch: int) -> float:
        """Fraction of the ramp done after `epoch` (1-based), clipped to [0, 1]."""
        return min(max(epoch, 0), self.options.loops) / self.options.loops


def build_curriculum(options: CurriculumOptions) -> Curriculum:
    """The λ schedule of the config's curriculum section, as a function epoch (1-based) → λ ≥ 0."""
    return CURRICULA.get(options.name)(options)


def curriculum_options(name: str, **values: object) -> CurriculumOptions:
    """The options of the curriculum registered as `name` with `values` (the rest at their defaults)."""
    return CURRICULA.get(name).Options(**values)
