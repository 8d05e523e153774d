"""ctkd/temperatures: gradient reversal, the fixed, global and instance τ modules, and the sign of their step."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ctkd.losses import kd_loss
from ctkd.temperatures import (
    FixedTemperature,
    GlobalTemperature,
    InstanceTemperature,
    build_temperature,
    gradient_reversal,
    temperature_options,
)


# docs/method.md, λ per epoch: E_loops = 10 (1-based epochs, as the authors' code).
# ---------------------------------------------------------------- gradient reversal
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_gradient_reversal_is_identity_forward_and_negates_scaled_gradient(lam: float) -> None:
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = gradient_reversal(x, lam)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([3.0, 5.0])).sum().backward()
    assert torch.allclose(x.grad, -lam * torch.tensor([3.0, 5.0]))


def test_gradient_reversal_rejects_negative_lambda() -> None:
    with pytest.raises(ValueError, match="magnitude"):
        gradient_reversal(torch.ones(1, requires_grad=True), -1.0)


# ---------------------------------------------------------------- temperature modules
def _starting_low(kind: str, **values: object):
    """A learned temperature's options: global starts at raw −2 (τ ≈ 3.4), instance has a 16-wide MLP."""
    own = {"global": {"init_raw": -2.0}, "instance": {"hidden_dim": 16}}[kind]
    return temperature_options(kind, **own, **values)


def test_global_temperature_starts_at_authors_value_and_stays_in_range() -> None:
    temp = GlobalTemperature()
    tau = temp(torch.zeros(2, 5), torch.zeros(2, 5), 1.0)
    assert tau.shape == () and tau.item() == pytest.approx(1 + 20 * torch.sigmoid(torch.tensor(1.0)).item())
    assert tau.item() == pytest.approx(15.62, abs=0.01)
    for raw in (-1e4, 1e4):
        temp.raw.data.fill_(raw)
        tau = temp(torch.zeros(2, 5), torch.zeros(2, 5), 1.0).item()
        assert 1.0 <= tau <= 21.0


def test_fixed_temperature_is_constant_and_parameter_free() -> None:
    temp = FixedTemperature(4.0)
    assert list(temp.parameters()) == []
    assert temp(torch.randn(3, 4), torch.randn(3, 4), 1.0).item() == 4.0
    with pytest.raises(ValueError):
        FixedTemperature(0.0)


def test_instance_temperature_gives_one_tau_per_sample_in_range() -> None:
    torch.manual_seed(0)
    temp = InstanceTemperature(num_classes=10, hidden_dim=16)
    tau = temp(torch.randn(6, 10), torch.randn(6, 10), 1.0)
    assert tau.shape == (6,)
    assert ((tau > 1.0) & (tau < 21.0)).all()
    assert tau.std() > 0  # depends on the sample


def test_instance_temperature_reverses_gradient_only_into_its_mlp() -> None:
    """The MLP's inputs are detached: the student's logits get no gradient through τ (docs/method.md, Instance-T)."""
    torch.manual_seed(0)
    temp = InstanceTemperature(num_classes=10, hidden_dim=16)
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    tau = temp(student, teacher, 1.0)
    tau.sum().backward()
    assert student.grad is None
    assert all(p.grad is not None for p in temp.parameters())


def test_build_temperature_by_name() -> None:
    fixed = build_temperature(temperature_options("fixed", value=3.0), num_classes=10)
    assert isinstance(fixed, FixedTemperature) and fixed.value.item() == 3.0
    glob = build_temperature(temperature_options("global", t_start=2.0, t_range=10.0, init_raw=0.0), num_classes=10)
    assert isinstance(glob, GlobalTemperature) and glob(None, None, 0.0).item() == pytest.approx(7.0)  # 2 + 10·σ(0)
    instance = build_temperature(temperature_options("instance", hidden_dim=8), num_classes=10)
    assert isinstance(instance, InstanceTemperature) and instance.mlp[0].weight.shape == (8, 20)
    with pytest.raises(ValueError, match="Did you mean 'global'"):
        temperature_options("globl")


@pytest.mark.parametrize("kind", ["global", "instance"])
def test_adversarial_sign_temperature_step_raises_kd_loss_student_step_lowers_it(kind: str) -> None:
    """Eqs. 6-7: one SGD step through the GRL raises the KD loss via τ, while the student's step lowers it."""
    torch.manual_seed(0)
    teacher = torch.randn(8, 10) * 4
    student = (torch.randn(8, 10) * 3).requires_grad_()
    # Start τ low (raw −2 → τ ≈ 3.4 for global) so the loss is sensitive to τ.
    temp = build_temperature(_starting_low(kind), num_classes=10)

    def loss_now() -> float:
        with torch.no_grad():
            return kd_loss(student, teacher, temp(student, teacher, 1.0)).item()

    before = loss_now()
    kd_loss(student, teacher, temp(student, teacher, 1.0)).backward()
    student_grad = student.grad.clone()
    # Temperature step alone: the loss goes up.
    with torch.no_grad():
        for p in temp.parameters():
            p -= 0.5 * p.grad
    assert loss_now() > before
    # Student step alone (from the updated τ): the loss goes down.
    after_temp = loss_now()
    with torch.no_grad():
        student -= 0.5 * student_grad
    assert loss_now() < after_temp


@pytest.mark.parametrize("kind", ["global", "instance"])
def test_without_reversal_the_temperature_step_lowers_kd_loss(kind: str) -> None:
    """The no-GRL ablation (temperature.adversarial: false): τ descends the loss, scaled by the same λ."""
    torch.manual_seed(0)
    teacher, student = torch.randn(8, 10) * 4, torch.randn(8, 10) * 3
    cfg = _starting_low(kind, adversarial=False)
    temp = build_temperature(cfg, num_classes=10)
    before = kd_loss(student, teacher, temp(student, teacher, 1.0))
    before.backward()
    with torch.no_grad():
        for p in temp.parameters():
            p -= 0.5 * p.grad
    assert kd_loss(student, teacher, temp(student, teacher, 1.0)).item() < before.item()
    temp.zero_grad()
    kd_loss(student, teacher, temp(student, teacher, 0.25)).backward()  # a quarter of the strength ...
    adversarial = build_temperature(dataclasses.replace(cfg, adversarial=True), num_classes=10)
    adversarial.load_state_dict(temp.state_dict())
    kd_loss(student, teacher, adversarial(student, teacher, 0.25)).backward()
    for plain, reversed_ in zip(temp.parameters(), adversarial.parameters()):
        assert plain.grad.abs().sum() > 0
        torch.testing.assert_close(plain.grad, -reversed_.grad)  # ... and the opposite sign of CTKD's
    assert "adversarial=False" in repr(temp)


# ---------------------------------------------------------------- KD accuracy in float32 inputs
def _authors_kd(student: torch.Tensor, teacher: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The authors' DistillKL: batch-mean KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) · τ², in the inputs' dtype."""
    return torch.nn.functional.kl_div(torch.log_softmax(student / tau, 1), torch.softmax(teacher / tau, 1),
                                      reduction="batchmean") * tau * tau


