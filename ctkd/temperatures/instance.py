"""Instance-T (Fig. 2b of the paper): a per-sample τ predicted by a small MLP from both networks' predictions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.options import spec

from .base import TEMPERATURES, BoundedTemperature, LearnedTemperatureOptions


@TEMPERATURES.register("instance")
class InstanceTemperature(BoundedTemperature):
    """Instance-T (Fig. 2b of the paper): a 2-layer MLP maps [softmax(z_t), softmax(z_s)] ([B, 2C]) to one τ each.

    Linear(2C, hidden) → ReLU → Linear(hidden, 1) (docs/differences.md, Instance-T architecture). The inputs are
    detached so the reversed gradient reaches only the MLP, never the student through its logits.
    """

    @dataclass(frozen=True)
    class Options(LearnedTemperatureOptions):
        """Instance-T: the shared options and the MLP's width."""

        name: str = "instance"
        hidden_dim: int = spec(256, ge=1)  # hidden width of the MLP that predicts τ

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
