"""Knowledge distillation (Eq. 1-2 of the paper): γ·CE + α·τ²·KL(p_t^τ ‖ p_s^τ).

τ comes from the temperature module: `fixed` is vanilla KD, `global`/`instance` make it CTKD.
"""
from __future__ import annotations

from dataclasses import dataclass

from ctkd.methods.base import METHODS, Method
from ctkd.options import MethodOptions


@METHODS.register("kd")
class KD(Method):
    """The CE and KD terms of the base class, nothing else."""

    paper = "Hinton et al., NeurIPS-W 2015"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """KD's weights are loss.ce_weight (γ) and loss.kd_weight (α)."""

        name: str = "kd"
