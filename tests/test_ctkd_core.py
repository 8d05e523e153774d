"""CTKD core pinned to the paper (docs/method.md): gradient reversal, temperature modules, λ curriculum, KD loss."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ctkd.curricula import build_curriculum, curriculum_options
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
PAPER_LAMBDA_TABLE = [0.0245, 0.0955, 0.2061, 0.3455, 0.5000, 0.6545, 0.7939, 0.9045, 0.9755, 1.0]


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


# ---------------------------------------------------------------- curriculum
def test_cosine_curriculum_matches_paper_table() -> None:
    lam = build_curriculum(curriculum_options("cosine", lambda_min=0.0, lambda_max=1.0, loops=10))
    got = [round(lam(epoch), 4) for epoch in range(1, 11)]
    assert got == PAPER_LAMBDA_TABLE
    assert lam(11) == 1.0 and lam(240) == 1.0


def test_cosine_curriculum_equals_authors_code_with_sign_flipped() -> None:
    """Our λ equals −CosineDecay(max=0, min=−1, loops=L).get_value(epoch) of the authors' code (docs/differences.md)."""

    def authors_value(i: int, max_value: float = 0.0, min_value: float = -1.0, loops: int = 10) -> float:
        i = min(max(i, 0), loops)
        return (math.cos(math.pi * i / loops) + 1) / 2 * (max_value - min_value) + min_value

    for loops in (5, 10):
        lam = build_curriculum(curriculum_options("cosine", lambda_min=0.0, lambda_max=1.0, loops=loops))
        for epoch in range(1, 30):
            assert lam(epoch) == pytest.approx(-authors_value(epoch, loops=loops), abs=1e-12)


def test_cosine_curriculum_imagenet_setting() -> None:
    lam = build_curriculum(curriculum_options("cosine", lambda_min=0.0, lambda_max=1.0, loops=5))
    assert [round(lam(e), 4) for e in range(1, 7)] == [0.0955, 0.3455, 0.6545, 0.9045, 1.0, 1.0]


def test_cosine_curriculum_respects_min_and_max_and_never_decreases() -> None:
    lam = build_curriculum(curriculum_options("cosine", lambda_min=0.2, lambda_max=0.8, loops=4))
    values = [lam(e) for e in range(0, 10)]
    assert values[0] == pytest.approx(0.2) and values[-1] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:]))  # Eq. 10


def test_linear_curriculum_is_a_correct_ramp() -> None:
    lam = build_curriculum(curriculum_options("linear", lambda_min=0.0, lambda_max=1.0, loops=10))
    assert [lam(e) for e in (1, 5, 10, 11)] == pytest.approx([0.1, 0.5, 1.0, 1.0])  # the authors' stops at 0.9
    shifted = build_curriculum(curriculum_options("linear", lambda_min=0.5, lambda_max=1.0, loops=5))
    assert shifted(0) == pytest.approx(0.5) and shifted(5) == pytest.approx(1.0)


def test_constant_curriculum() -> None:
    lam = build_curriculum(curriculum_options("constant", lambda_max=0.7))
    assert lam(1) == lam(100) == 0.7


def test_curriculum_rejects_bad_bounds_and_unknown_name() -> None:
    with pytest.raises(ValueError, match="lambda_min"):
        build_curriculum(curriculum_options("cosine", lambda_min=0.5, lambda_max=0.1, loops=10))
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        curriculum_options("cosin")


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


# ---------------------------------------------------------------- KD loss
@pytest.mark.parametrize("name,tau", [("kd_T1.0", 1.0), ("kd_T4.0", 4.0), ("kd_T15.62", 15.62)])
def test_kd_loss_matches_authors_values(golden, name: str, tau: float) -> None:
    d = golden.loss_inputs()
    got = kd_loss(d["student_logits"], d["teacher_logits"], torch.tensor([tau])).item()
    assert got == pytest.approx(golden.reference_loss(name), rel=1e-5)
    assert kd_loss(d["student_logits"], d["teacher_logits"], tau).item() == pytest.approx(got, rel=1e-7)


def test_per_sample_kd_matches_authors_readme_and_exact_formula(golden) -> None:
    d = golden.loss_inputs()
    s, t, tau = d["student_logits"], d["teacher_logits"], d["tau_per_sample"]
    got = kd_loss(s, t, tau).item()
    assert got == pytest.approx(golden.reference_loss("kd_instance"), rel=1e-3)  # theirs adds 1e-7 to p_t
    s64, t64, tau64 = s.double(), t.double(), tau.double()[:, None]
    p_t = torch.softmax(t64 / tau64, 1)
    exact = (tau64[:, 0] ** 2 * (p_t * (p_t.log() - torch.log_softmax(s64 / tau64, 1))).sum(1)).mean().item()
    assert got == pytest.approx(exact, rel=1e-5)


def test_per_sample_kd_with_equal_taus_equals_scalar_kd() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert kd_loss(s, t, torch.full((5,), 3.0)).item() == pytest.approx(kd_loss(s, t, 3.0).item(), rel=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_fp32_under_bf16() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    student, teacher = logits.bfloat16(), (logits * 1.1).bfloat16()
    out = kd_loss(student, teacher, 4.0)
    assert out.dtype == torch.float32
    assert out.item() == kd_loss(student.float(), teacher.float(), 4.0).item()  # computed in fp32, not in bf16


def test_kd_loss_rejects_misshaped_per_sample_temperature() -> None:
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        kd_loss(torch.randn(4, 3), torch.randn(4, 3), torch.ones(3))


# ---------------------------------------------------------------- KD accuracy in float32 inputs
def _authors_kd(student: torch.Tensor, teacher: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The authors' DistillKL: batch-mean KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) · τ², in the inputs' dtype."""
    return torch.nn.functional.kl_div(torch.log_softmax(student / tau, 1), torch.softmax(teacher / tau, 1),
                                      reduction="batchmean") * tau * tau


def _errors(loss_fn, student: torch.Tensor, teacher: torch.Tensor, tau: float) -> tuple[float, float, float]:
    """Relative errors of `loss_fn` on float32 inputs against the float64 reference (Eq. 1 in float64): the loss, its
    gradient in the student logits (max over entries, relative to the largest) and its gradient in τ."""

    def value_and_grads(fn, dtype):
        s = student.to(dtype).requires_grad_(True)
        t = torch.tensor(tau, dtype=dtype, requires_grad=True)
        loss = fn(s, teacher.to(dtype), t)
        return (loss.double(), *(g.double() for g in torch.autograd.grad(loss, [s, t])))

    ref = value_and_grads(_authors_kd, torch.float64)
    got = value_and_grads(loss_fn, torch.float32)
    return (abs(got[0] - ref[0]).item() / abs(ref[0]).item(),
            ((got[1] - ref[1]).abs().max() / ref[1].abs().max()).item(),
            abs(got[2] - ref[2]).item() / abs(ref[2]).item())


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 8.0, 15.62, 21.0])
@pytest.mark.parametrize("spread", [1.0, 0.25])  # the golden logits, and logits 4× closer to uniform
def test_kd_in_float32_is_at_least_as_accurate_as_the_authors_over_the_whole_tau_range(
    golden, tau: float, spread: float
) -> None:
    """At τ ≈ 15 the τ-gradient 2τ·KL + τ²·∂KL/∂τ cancels to ~1e-3 of its terms: float32 arithmetic (theirs, or ours
    before) leaves up to ~2e-3 relative error in what trains τ; ours computes in float64 and stays at rounding."""
    d = golden.loss_inputs()
    student, teacher = d["student_logits"] * spread, d["teacher_logits"] * spread
    ours = _errors(kd_loss, student, teacher, tau)
    theirs = _errors(_authors_kd, student, teacher, tau)
    for mine, authors in zip(ours, theirs):
        assert mine <= max(authors, 1e-6)  # never worse than the authors' float32 code ...
        assert mine < 1e-5  # ... and at float32 rounding everywhere
