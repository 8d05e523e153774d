"""Logit standardisation (LS; Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation").

Each sample's logits, the student's and the teacher's alike, are z-scored, z ← (z − mean(z)) / (std(z) + ε), before
the α·KD(τ) term divides them by τ, so the student matches the teacher's logit relations rather than their range and
variance; τ then acts as a base temperature for both. Method `ls` is the base class's γ·CE + α·KD(τ) on standardised
logits (`kd_inputs`); the temperature module still sees the raw logits, and a learned τ (CTKD) still gets its
gradient through the softmaxes and the τ² factor. DKD takes the same step with its `standardize` option.

Settings (the LS repo, sunshangquan/logit-standardization-KD, CIFAR-100): README's KD+Ours command
``--logit-stand --base-temp 2 --kd-weight 9`` sets KD weight 9 and τ = 2 on their KD config, whose CE weight is 0.1
(master's mdistiller/engine/cfg.py, "intentional" per the author in their issue #25; one earlier version had 1), i.e.
``loss: {ce_weight: 0.1, kd_weight: 9.0}`` and ``temperature: {name: fixed, value: 2.0}`` (a few pairs use base
temperature 3, per their log names); with CTKD their CTKD/scripts/run_cifar_distill.sh uses the same ``-r 0.1 -a 9
--kd_T 2``.

Paper vs. code: the paper's z-score divides by the standard deviation; the authors' `normalize` uses torch's default,
the unbiased (C − 1) estimate, plus ε = 1e-7. We follow the code: it differs from the population std by the constant
√(C/(C − 1)), i.e. a 0.5 % larger effective τ at C = 100.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ctkd.methods.base import METHODS, Method
from ctkd.options import MethodOptions, spec

EPS = 1e-7  # the LS repo's ε in the denominator of its normalize (mdistiller/distillers/KD.py)


def standardize(logits: Tensor, eps: float = EPS) -> Tensor:
    """(B, C) logits z-scored per sample, in float64: (z − mean) / (std + ε) with the unbiased std (authors' code).

    float64 because the KD and DKD terms that follow compute in float64 anyway (ctkd/losses.py says why); a constant
    row (std 0) maps to zeros with a finite gradient.
    """
    x = logits.double()
    return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)


@METHODS.register("ls")
class LS(Method):
    """γ·CE + α·KD(τ) on z-scored student and teacher logits (the base class's terms, standardised inputs)."""

    paper = "Sun et al., CVPR 2024"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """The ε of the z-score; the weights are loss.ce_weight and loss.kd_weight (LS repo: 0.1 and 9, τ = 2)."""

        name: str = "ls"
        eps: float = spec(EPS, gt=0)  # ε added to the std (the LS repo's normalize: 1e-7)

    def kd_inputs(self, logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Both logits standardised (Sun et al.'s Z-score pre-process) before the KD term divides them by τ."""
        eps = self.options.eps
        return standardize(logits, eps), standardize(teacher_logits, eps)
