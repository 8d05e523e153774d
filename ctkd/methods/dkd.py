"""Decoupled knowledge distillation (DKD, Zhao et al. CVPR 2022) with the CTKD temperature inside it.

DKD splits KD into a target-class term (TCKD: KL of the binary target / non-target distributions) and a non-target
term (NCKD: KL of the distributions over the other C−1 classes), weighted α and β. The τ of both terms is the
temperature module's, so CTKD learns DKD's temperature (docs/settings.md, CTKD as a plug-in). The CTKD scripts use
γ = 1, α_KD = 0 (the config's loss section), DKD α = 1, β = 2 and no warm-up.

`standardize` (off by default) z-scores both logits per sample first, as logit standardisation does (Sun et al.,
CVPR 2024; ctkd/methods/ls.py): DKD's terms, and an α·KD term if the config keeps one, then see standardised logits.
The LS repo's DKD+Ours recipe is ``--logit-stand --base-temp 2 --kd-weight 9``, which their tools/train.py turns into
DKD's α and β times 9 at τ = 2: here ``standardize: true, weight: 9`` with a fixed τ of 2 (an earlier version of that
script set β = 9·α after scaling α and left DKD's τ at 4; docs/differences.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ctkd.losses import temperature_column
from ctkd.methods.base import METHODS, Method, StepInputs
from ctkd.methods.ls import standardize
from ctkd.options import MethodOptions, spec


def _non_target_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """The (B, C−1) logits of every class but each sample's target, in class order.

    Gathered with an index tensor rather than masked: the target class is absent from the graph, so no underflowed
    probability (and no 0·log 0 in the backward) appears (docs/differences.md, DKD with a learnable temperature).
    """
    positions = torch.arange(logits.shape[1] - 1, device=logits.device)
    index = positions + (positions.unsqueeze(0) >= targets.unsqueeze(1)).long()  # skip the target's column
    return logits.gather(1, index)


def _binary_log_probs(scaled: Tensor, non_target: Tensor, targets: Tensor) -> Tensor:
    """(B, 2) log-probabilities of (target, rest) from logits already divided by τ, without a log of a sum."""
    log_total = torch.logsumexp(scaled, dim=1)
    log_target = scaled.gather(1, targets.unsqueeze(1)).squeeze(1) - log_total
    log_rest = torch.logsumexp(non_target, dim=1) - log_total
    return torch.stack([log_target, log_rest], dim=1)


def _kl(student_log: Tensor, teacher_log: Tensor) -> Tensor:
    """Per-sample KL(teacher ‖ student) from log-probabilities: (B,)."""
    return F.kl_div(student_log, teacher_log, reduction="none", log_target=True).sum(dim=1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: Tensor | float,
    alpha: float = 1.0,
    beta: float = 2.0,
) -> Tensor:
    """α·TCKD + β·NCKD (Eq. 7 of the DKD paper), each KL times τ² and averaged over the batch.

    Args:
        student_logits: (B, C), carries the gradient to the student.
        teacher_logits: (B, C).
        targets: (B,) class labels.
        temperature: a float, a 0-d tensor, or a (B,) per-sample τ (each sample's KL times its own τ²); a learnable τ
            receives its gradient through the softmaxes and the τ² factor.
        alpha: weight of the target-class term TCKD.
        beta: weight of the non-target term NCKD.

    Both terms come from log-sum-exps over exactly the classes involved, so every gradient stays finite, and are
    computed in float64 (docs/differences.md, DKD with a learnable temperature; Losses in float64).
    """
    with torch.autocast(student_logits.device.type, enabled=False):  # float64, as KD (ctkd/losses.py says why)
        tau = temperature_column(temperature, student_logits.double())  # (1, 1) or (B, 1)
        student = student_logits.double() / tau
        teacher = teacher_logits.double() / tau
        student_rest = _non_target_logits(student, targets)
        teacher_rest = _non_target_logits(teacher, targets)
        tckd = _kl(_binary_log_probs(student, student_rest, targets),
                   _binary_log_probs(teacher, teacher_rest, targets))
        nckd = _kl(F.log_softmax(student_rest, dim=1), F.log_softmax(teacher_rest, dim=1))
        return ((alpha * tckd + beta * nckd) * tau.squeeze(1) ** 2).mean().float()


@METHODS.register("dkd")
class DKD(Method):
    """β·DKD(τ) beside γ·CE (and α·KD, which DKD configs switch off with loss.kd_weight 0)."""

    paper = "Zhao et al., CVPR 2022"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """DKD's weights; the temperature comes from the temperature section."""

        name: str = "dkd"
        weight: float = spec(1.0, ge=0)  # β: weight of the DKD term in the total loss
        alpha: float = spec(1.0, ge=0)  # weight of the target-class term TCKD
        beta: float = spec(2.0, ge=0)  # weight of the non-target term NCKD (2 in the CTKD scripts)
        warmup_epochs: int = spec(0, ge=0)  # > 0: the term grows linearly over these epochs (DKD's own recipe)
        standardize: bool = False  # z-score both logits first (logit standardisation, Sun et al.); off: as published

    uses_tau = True  # the CTKD temperature is DKD's own (its configs switch the KD term off)

    def warmup_factor(self, epoch: int) -> float:
        """min(epoch / warmup_epochs, 1) for 1-based `epoch`; 1 without warm-up (the CTKD scripts)."""
        warmup = self.options.warmup_epochs
        return 1.0 if warmup == 0 else min(epoch / warmup, 1.0)

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """The weighted DKD term."""
        opts = self.options
        logits, teacher_logits = self.kd_inputs(step.logits, step.teacher.logits)
        loss = dkd_loss(logits, teacher_logits, step.batch.targets, step.tau, alpha=opts.alpha, beta=opts.beta)
        return {"loss_dkd": opts.weight * self.warmup_factor(step.ctx.epoch) * loss}

    def kd_inputs(self, logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The logits DKD's terms (and an α·KD term) see: z-scored with `standardize`, else as they are."""
        if not self.options.standardize:
            return logits, teacher_logits
        return standardize(logits), standardize(teacher_logits)
