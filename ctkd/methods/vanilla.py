"""Plain cross-entropy training: teachers and student baselines."""
from __future__ import annotations

from dataclasses import dataclass

from ctkd.methods.base import METHODS, Method
from ctkd.options import MethodOptions


@METHODS.register("vanilla")
class Vanilla(Method):
    """Cross-entropy on the student's logits alone; no teacher, no temperature (loss weights do not apply)."""

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """Vanilla has no options."""

        name: str = "vanilla"

    uses_teacher = False

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - the base class's signature
        super().__init__(*args, **kwargs)
        self.ce_weight = 1.0  # plain cross-entropy: loss.ce_weight weighs CE against a KD term that is absent here
