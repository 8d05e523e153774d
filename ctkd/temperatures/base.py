"""What every temperature shares: the registry, the gradient-reversal layer and the bounded learned τ.

Temperature modules give τ: a fixed one (plain KD), one learnable global τ, or a per-sample τ from an MLP (CTKD), each
in its own module of this package. All share one call signature, ``module(student_logits, teacher_logits,
grl_lambda) -> τ``, and one constructor from the config, ``from_config(options, num_classes=...)``; each owns its
options (the ``temperature:`` section, selected by ``temperature.name`` and validated against the class's
`Options`), so a config swaps them by name. The learnable ones are trained *adversarially*: their raw output passes
through a gradient-reversal layer (docs/method.md, Gradient reversal) whose strength λ ≥ 0 follows the curriculum,
then is mapped into (t_start, t_start + t_range) by τ = t_start + t_range·sigmoid(raw) (docs/method.md, Range
mapping). τ and the modules' layers always compute in float32: autocast (runtime.amp) is disabled inside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ctkd.options import TemperatureOptions, spec
from ctkd.registry import Registry

TEMPERATURES = Registry("temperature")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant factor."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.factor * grad, None


def gradient_reversal(x: Tensor, grl_lambda: float | Tensor) -> Tensor:
    """Gradient-reversal layer (Eq. 8 of the paper): forward is the identity, backward multiplies the gradient by −λ.

    ``grl_lambda`` is the non-negative magnitude of the curriculum (Eq. 11); the minus sign lives here
    (docs/differences.md, Sign of λ).
    """
    _check_magnitude(grl_lambda)
    return _ScaleGradient.apply(x, -grl_lambda)


def gradient_scale(x: Tensor, grl_lambda: float | Tensor) -> Tensor:
    """The same layer without the reversal (backward multiplies by +λ): the paper's "no GRL" ablation, where τ
    minimises the loss like every other parameter, with the same curriculum on its strength."""
    _check_magnitude(grl_lambda)
    return _ScaleGradient.apply(x, grl_lambda)


def _check_magnitude(grl_lambda: float | Tensor) -> None:
    """A Python λ must be ≥ 0; a tensor λ (the training loop's, made from the curriculum) is not read: no host sync."""
    if not isinstance(grl_lambda, Tensor) and grl_lambda < 0:
        raise ValueError(f"grl_lambda is a magnitude and must be ≥ 0, got {grl_lambda}")


@dataclass(frozen=True)
class LearnedTemperatureOptions(TemperatureOptions):
    """What every learned τ shares: its range, its direction and its own optimizer settings."""

    learnable: ClassVar[bool] = True
    t_start: float = spec(1.0, gt=0)  # lower bound of a learned τ: τ = t_start + t_range · sigmoid(raw)
    t_range: float = spec(20.0, gt=0)  # width of the range of a learned τ
    adversarial: bool = True  # learned τ maximises the loss through the reversal (CTKD); false: it minimises it
    lr: float | None = spec(None, gt=0)  # learning rate of the temperature; None → the student's LR schedule
    weight_decay: float | None = spec(None, ge=0)  # weight decay of the temperature; None → optimizer.weight_decay


class BoundedTemperature(nn.Module):
    """Base class of the learnable temperatures: maps a reversed raw output into (t_start, t_start + t_range)."""

    def __init__(self, t_start: float, t_range: float, adversarial: bool = True) -> None:
        super().__init__()
        if t_start <= 0 or t_range <= 0:
            raise ValueError(f"t_start and t_range must be > 0, got {t_start} and {t_range}")
        self.t_start = t_start
        self.t_range = t_range
        self.adversarial = adversarial

    def bound(self, raw: Tensor, grl_lambda: float) -> Tensor:
        """τ = t_start + t_range·sigmoid(GRL_λ(raw)); the sigmoid after the GRL as in the authors' code."""
        layer = gradient_reversal if self.adversarial else gradient_scale
        with torch.autocast(raw.device.type, enabled=False):  # τ in float32, even inside a caller's autocast
            return self.t_start + self.t_range * torch.sigmoid(layer(raw.float(), grl_lambda))

    def extra_repr(self) -> str:
        """Range and direction in module printouts."""
        return f"t_start={self.t_start}, t_range={self.t_range}, adversarial={self.adversarial}"


def build_temperature(cfg: TemperatureOptions, *, num_classes: int) -> nn.Module:
    """The temperature module registered as `cfg.name`, built from the config's temperature section."""
    return TEMPERATURES.get(cfg.name).from_config(cfg, num_classes=num_classes)


def temperature_options(name: str, **values: object) -> TemperatureOptions:
    """The options of the temperature registered as `name` with `values` (the rest at their defaults)."""
    return TEMPERATURES.get(name).Options(**values)
