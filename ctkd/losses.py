"""Distillation losses, computed in float32 whatever the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float) -> Tensor:
    """Eq. 1: τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), summed over classes and averaged over the batch.

    Args:
        student_logits: (B, C), carries the gradient to the student.
        teacher_logits: (B, C).
        temperature: a float or a 0-d tensor (one τ for the batch), or a (B,) tensor (one τ per sample); a learnable
            τ receives its gradient through both the softmaxes and the τ² factor.

    The per-sample form is the vectorised version of the authors' README loop, without its 1e-7 on the teacher's
    probabilities (docs/differences.md, Per-sample KD). fp32 because a near-zero KL in bf16 comes out negative.
    """
    student = student_logits.float()
    teacher = teacher_logits.float()
    with torch.autocast(student.device.type, enabled=False):  # float32 even inside a caller's autocast
        tau = temperature_column(temperature, student)
        kl = F.kl_div(
            F.log_softmax(student / tau, dim=1),
            F.log_softmax(teacher / tau, dim=1),
            reduction="none",
            log_target=True,
        ).sum(dim=1)  # (B,)
        return (kl * tau.squeeze(1) ** 2).mean()


def temperature_column(temperature: Tensor | float, like: Tensor) -> Tensor:
    """τ as a float32 tensor broadcastable against (B, C): (1, 1) for a scalar, (B, 1) for a per-sample τ."""
    tau = temperature if isinstance(temperature, Tensor) else like.new_tensor(float(temperature))
    tau = tau.float()
    if tau.dim() == 0 or tau.numel() == 1:
        return tau.reshape(1, 1)
    if tau.shape != (like.shape[0],):
        raise ValueError(f"a per-sample temperature must have shape ({like.shape[0]},), got {tuple(tau.shape)}")
    return tau.unsqueeze(1)
