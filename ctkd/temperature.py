"""Temperature modules: fixed τ (plain KD), one learnable global τ, or a per-sample τ from an MLP (CTKD).

All share one call signature, ``module(student_logits, teacher_logits, grl_lambda) -> τ``, and one constructor from
the config, ``from_config(options, num_classes=...)``; each owns its options (the ``temperature:`` section, selected
by ``temperature.name`` and validated against the class's `Options`), so a config swaps them by name. The learnable
ones are trained *adversarially*: their raw output passes through a gradient-reversal layer (docs/method.md,
Gradient reversal) whose strength λ ≥ 0 follows the curriculum, then is mapped into (t_start, t_start + t_range) by
τ = t_start + t_range·sigmoid(raw) (docs/method.md, Range mapping). τ and the modules' layers always compute in
float32: autocast (runtime.amp) is disabled inside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.config import TemperatureConfig
from ctkd.registry import Registry
from ctkd.schema import _spec

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

    ``grl_lambda`` is the non-negative magnitude of the curriculum (Eq. 11); the minus sign lives here, in code. The
    authors' code instead multiplies by +λ and feeds a negative λ from the config (decay_max 0, decay_min −1), a trap
    that silently turns the adversary into a helper if a positive λ is passed.
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
class LearnedTemperatureOptions(TemperatureConfig):
    """What every learned τ shares: its range, its direction and its own optimizer settings."""

    learnable: ClassVar[bool] = True
    t_start: float = _spec(1.0, gt=0)  # lower bound of a learned τ: τ = t_start + t_range · sigmoid(raw)
    t_range: float = _spec(20.0, gt=0)  # width of the range of a learned τ
    adversarial: bool = True  # learned τ maximises the loss through the reversal (CTKD); false: it minimises it
    lr: float | None = _spec(None, gt=0)  # learning rate of the temperature; None → the student's LR schedule
    weight_decay: float | None = _spec(None, ge=0)  # weight decay of the temperature; None → optimizer.weight_decay


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


@TEMPERATURES.register("fixed")
class FixedTemperature(nn.Module):
    """A constant τ (vanilla KD, default 4); no parameters, so the curriculum has no effect."""

    @dataclass(frozen=True)
    class Options(TemperatureConfig):
        """A fixed τ has its value and nothing else (a curriculum does not apply to it)."""

        name: str = "fixed"
        value: float = _spec(4.0, gt=0)  # τ

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


@TEMPERATURES.register("instance")
class InstanceTemperature(BoundedTemperature):
    """Instance-T (Fig. 2b of the paper): a 2-layer MLP maps [softmax(z_t), softmax(z_s)] ([B, 2C]) to one τ each.

    The authors never released this module; the layout is our assumption (docs/differences.md, Instance-T
    architecture): Linear(2C, hidden) → ReLU → Linear(hidden, 1). The inputs are detached so the reversed gradient
    reaches only the MLP, never the student through its logits (otherwise the student would be pushed to *raise* the
    KD loss).
    """

    @dataclass(frozen=True)
    class Options(LearnedTemperatureOptions):
        """Instance-T: the shared options and the MLP's width."""

        name: str = "instance"
        hidden_dim: int = _spec(256, ge=1)  # hidden width of the MLP that predicts τ

    def __init__(
        self, num_classes: int, hidden_dim: int = 256, t_start: float = 1.0, t_range: float = 20.0,
        adversarial: bool = True,
    ) -> None:
        super().__init__(t_start, t_range, adversarial)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_classes, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 1),
        )

    @classmethod
    def from_config(cls, cfg: Options, *, num_classes: int) -> InstanceTemperature:
        """Build from the config's temperature section."""
        return cls(num_classes, cfg.hidden_dim, cfg.t_start, cfg.t_range, cfg.adversarial)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, grl_lambda: float) -> Tensor:
        """Return τ of shape [B]."""
        with torch.autocast(student_logits.device.type, enabled=False):  # the MLP in float32 under any autocast
            probs = torch.cat(
                [F.softmax(teacher_logits.detach().float(), dim=1), F.softmax(student_logits.detach().float(), dim=1)],
                dim=1,
            )  # (B, 2C)
            raw = self.mlp(probs).squeeze(1)  # (B,)
        return self.bound(raw, grl_lambda)


def build_temperature(cfg: TemperatureConfig, *, num_classes: int) -> nn.Module:
    """The temperature module registered as `cfg.name`, built from the config's temperature section."""
    return TEMPERATURES.get(cfg.name).from_config(cfg, num_classes=num_classes)


def temperature_options(name: str, **values: object) -> TemperatureConfig:
    """The options of the temperature registered as `name` with `values` (the rest at their defaults)."""
    return TEMPERATURES.get(name).Options(**values)
