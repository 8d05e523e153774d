"""No curriculum: λ = λ_max from the first epoch (for ablations)."""
from __future__ import annotations

from dataclasses import dataclass

from ctkd.options import CurriculumOptions, spec

from .base import CURRICULA


@CURRICULA.register("constant")
class Constant:
    """No curriculum: λ = λ_max from the first epoch (for ablations)."""

    @dataclass(frozen=True)
    class Options(CurriculumOptions):
        """A constant λ has its value and nothing else."""

        name: str = "constant"
        lambda_max: float = spec(1.0, ge=0)  # λ in every epoch

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, epoch: int) -> float:
        return self.options.lambda_max
