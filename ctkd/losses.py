"""Distillation losses with a temperature, computed in float64 whatever the input dtype, returned as float32.

float64 because float32 loses digits exactly where CTKD works: near a uniform distribution (τ ≈ 15) the KL is a
small difference of large log-probabilities, and its τ-gradient 2τ·KL + τ²·∂KL/∂τ a small difference of two terms
that cancel to about 1e-3 of their size, so float32 leaves ~1e-3 relative error in the gradient that trains τ
(docs/differences.md, Losses in float64). The logits of a batch are a few thousand values: the cost is negligible.
"""
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

    Computed in float64, returned as a float32 0-d tensor (docs/differences.md, Per-sample KD; Losses in float64).
    """
    student = student_logits.double()
    teacher = teacher_logits.double()
    with torch.autocast(student.device.type, enabled=False):  # never lowered inside a caller's autocast
        tau = temperature_column(temperature, student)
        kl = F.kl_div(
            F.log_softmax(student / tau, dim=1),
            F.log_softmax(teacher / tau, dim=1),
            reduction="none",
            log_target=True,
        ).sum(dim=1)  # (B,)
        return (kl * tau.squeeze(1) ** 2).mean().float()


def temperature_column(temperature: Tensor | float, like: Tensor) -> Tensor:
    """τ as a tensor of `like`'s dtype broadcastable against (B, C): (1, 1) for a scalar, (B, 1) for a per-sample τ."""
    tau = temperature if isinstance(temperature, Tensor) else like.new_tensor(float(temperature))
    tau = tau.to(like.dtype)
    if tau.dim() == 0 or tau.numel() == 1:
        return tau.reshape(1, 1)
    if tau.shape != (like.shape[0],):
        raise ValueError(f"a per-sample temperature must have shape ({like.shape[0]},), got {tuple(tau.shape)}")
    return tau.unsqueeze(1)
