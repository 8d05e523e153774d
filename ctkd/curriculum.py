"""The curriculum on λ, the strength of the gradient reversal (Eqs. 9-11 of the paper; docs/method.md, Curriculum).

λ is a pure function of the epoch, set once per epoch (never per iteration) with epochs counted from 1 as in the
authors' code (docs/method.md, Curriculum (Eq. 11)), so resuming needs nothing but the epoch number.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from ctkd.registry import Registry

CURRICULA = Registry("curriculum")

Curriculum = Callable[[int], float]


def _progress(epoch: int, loops: int) -> float:
    """Fraction of the ramp done after `epoch` (1-based), clipped to [0, 1]."""
    if loops < 1:
        raise ValueError(f"curriculum.loops (E_loops) must be ≥ 1, got {loops}")
    return min(max(epoch, 0), loops) / loops


@CURRICULA.register("cosine")
def cosine(lambda_min: float = 0.0, lambda_max: float = 1.0, loops: int = 10) -> Curriculum:
    """Eq. 11: λ_n = λ_min + ½(λ_max − λ_min)(1 + cos((1 + min(E_n, E_loops)/E_loops)·π)).

    With the defaults: λ(1) = 0.0245, λ(5) = 0.5, λ(n ≥ 10) = 1.
    """

    def schedule(epoch: int) -> float:
        t = _progress(epoch, loops)
        return lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + math.cos((1.0 + t) * math.pi))

    return schedule


@CURRICULA.register("linear")
def linear(lambda_min: float = 0.0, lambda_max: float = 1.0, loops: int = 10) -> Curriculum:
    """A linear ramp λ_n = λ_min + (λ_max − λ_min)·min(E_n, E_loops)/E_loops.

    This is the ramp the authors' `LinearDecay` meant; theirs ignores the start value as an offset and stops at
    0.9 of the range (docs/differences.md, Linear curriculum).
    """

    def schedule(epoch: int) -> float:
        return lambda_min + (lambda_max - lambda_min) * _progress(epoch, loops)

    return schedule


@CURRICULA.register("constant")
def constant(lambda_min: float = 0.0, lambda_max: float = 1.0, loops: int = 10) -> Curriculum:
    """No curriculum: λ = λ_max from the first epoch (for ablations)."""

    def schedule(epoch: int) -> float:
        return lambda_max

    return schedule


def build_curriculum(name: str, *, lambda_min: float, lambda_max: float, loops: int) -> Curriculum:
    """The λ schedule registered as `name`, as a function epoch (1-based) → λ ≥ 0."""
    if lambda_min < 0 or lambda_max < lambda_min:
        raise ValueError(f"need 0 ≤ lambda_min ≤ lambda_max, got lambda_min={lambda_min}, lambda_max={lambda_max}")
    return CURRICULA.build(name, lambda_min=lambda_min, lambda_max=lambda_max, loops=loops)
