"""DIST (Huang et al., NeurIPS 2022) and logit standardisation (Sun et al., CVPR 2024): losses and gradients against
float64 formulas, invariants, τ (fixed, learned, per sample), the global batch, real distillers and end-to-end runs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ctkd.methods.dist as dist_module
import ctkd.models as models
from conftest import (
    assert_entrywise_close,
    ctkd_config,
    load,
    numeric_gradient,
    one_epoch_record,
    randn_seeded,
    write_yaml,
)
from ctkd.config import ConfigError, LossConfig, load_config
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.losses import kd_loss
from ctkd.methods import MethodSetup, StepContext, TeacherOutput
from ctkd.methods.base import StepInputs
from ctkd.methods.dist import DIST, dist_loss
from ctkd.methods.ls import LS, standardize
from ctkd.temperatures import FixedTemperature, GlobalTemperature, InstanceTemperature

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny forwards: one torch thread
STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
REL = 1e-5


def _softmax(row: list[float], tau: float) -> list[float]:
    top = max(row)
    exps = [math.exp((x - top) / tau) for x in row]
    return [e / sum(exps) for e in exps]


# ------------------------------------------------------------------------------------------------ DIST reference
def _pearson(u: list[float], v: list[float]) -> float:
    """Pearson correlation as DIST's code computes it: the cosine of the centred vectors, ε = 1e-8 added to the
    product of their norms (hunto/DIST_KD, dist_kd.py)."""
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [a - mu for a in u], [b - mv for b in v]
    norms = math.sqrt(sum(a * a for a in du)) * math.sqrt(sum(b * b for b in dv))
    return sum(a * b for a, b in zip(du, dv)) / (norms + 1e-8)


def dist_reference(student: list, teacher: list, taus: list[float], beta: float, gamma: float) -> float:
    """DIST in float64 loops: y = softmax(z/τ); inter = mean_i τ_i²·(1 − ρ(y_s,i, y_t,i)) over samples; intra =
    mean(τ²)·mean_c (1 − ρ(y_s,:c, y_t,:c)) over classes (for one τ: the paper's τ²·(β·L_inter + γ·L_intra), with
    the τ² of the authors' code)."""
    y_s = [_softmax(row, tau) for row, tau in zip(student, taus)]
    y_t = [_softmax(row, tau) for row, tau in zip(teacher, taus)]
    n, classes = len(student), len(student[0])
    inter = sum(tau**2 * (1 - _pearson(s, t)) for s, t, tau in zip(y_s, y_t, taus)) / n
    columns = [([row[c] for row in y_s], [row[c] for row in y_t]) for c in range(classes)]
    intra = sum(tau**2 for tau in taus) / n * sum(1 - _pearson(s, t) for s, t in columns) / classes
    return beta * inter + gamma * intra


# ------------------------------------------------------------------------------------------------ DIST: values
@pytest.mark.parametrize("per_sample,beta,gamma", [(False, 2.0, 2.0), (True, 2.0, 2.0), (False, 1.0, 0.0),
                                                   (False, 0.0, 1.0)])
def test_dist_loss_and_gradient_match_an_independent_float64_formula(per_sample: bool, beta: float,
                                                                     gamma: float) -> None:
    student, teacher = (3 * randn_seeded(1, 6, 5)).double().requires_grad_(True), 4 * randn_seeded(2, 6, 5)
    tau = 1 + 6 * torch.rand(6, generator=torch.Generator().manual_seed(3)) if per_sample else torch.tensor(4.0)
    taus = tau.tolist() if per_sample else [4.0] * 6
    ours = dist_loss(student, teacher, tau, beta=beta, gamma=gamma)
    expected = dist_reference(student.tolist(), teacher.tolist(), taus, beta, gamma)
    assert expected > 0.05 and ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected, rel=REL)
    ours.backward()
    numeric = numeric_gradient(lambda s: dist_reference(s, teacher.tolist(), taus, beta, gamma), student.detach())
    assert (student.grad - numeric).abs().max() <= 1e-5 * numeric.abs().max()


def test_dist_is_zero_for_a_copy_of_the_teacher_and_ignores_a_shift_of_each_sample() -> None:
    teacher = 4 * randn_seeded(4, 8, 10)
    assert dist_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-4)  # ρ = ‖a‖²/(‖a‖² + ε): ε remains
    student = randn_seeded(5, 8, 10)
    shifted = student + 7 * randn_seeded(6, 8, 1)  # softmax ignores a per-sample constant, so does DIST
    assert dist_loss(shifted, teacher, 4.0).item() == pytest.approx(dist_loss(student, teacher, 4.0).item(), rel=1e-6)
    assert dist_loss(student, teacher, 4.0).item() > 0.1


def test_a_one_sample_batch_gives_a_finite_loss_and_gradient() -> None:
    """The intra-class correlation of one sample is 0/ε (no spread across the batch): finite, no 0/0 gradient."""
    student = randn_seeded(7, 1, 10).requires_grad_(True)
    loss = dist_loss(student, randn_seeded(8, 1, 10), torch.tensor(4.0, requires_grad=True))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dist_gives_a_learnable_tau_a_finite_gradient_per_sample_too() -> None:
    student, teacher = randn_seeded(9, 6, 10), 3 * randn_seeded(10, 6, 10)
    for raw in (torch.tensor(0.3, requires_grad=True), torch.linspace(-3, 3, 6).requires_grad_(True)):
        dist_loss(student, teacher, 1 + 20 * torch.sigmoid(raw)).backward()
        assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ DIST: global batch
def test_a_rank_computes_dist_on_the_whole_global_batch(monkeypatch) -> None:
    """Rank 0 of 2 holds samples 0-2 of a 5-sample global batch with a per-sample τ; the gather (a concatenation
    here) returns rank 1's rows after its own. The term equals the single-process loss of all 5 samples, and the
    gradients into the local logits and τ equal their single-process gradients."""
    student, teacher, tau = randn_seeded(11, 5, 7), 3 * randn_seeded(12, 5, 7), 1 + 5 * torch.rand(5)
    local = {"s": student[:3].clone().requires_grad_(True), "t": teacher[:3].clone(),
             "tau": tau[:3].clone().requires_grad_(True)}
    rest = {"s": student[3:], "t": teacher[3:], "tau": tau[3:]}

    def gather(x: Tensor, size: int) -> Tensor:
        key = next(k for k, v in local.items() if v is x)
        assert size == 5
        return torch.cat([x, rest[key]])

    monkeypatch.setattr(dist_module, "gather_batch", gather)
    method = DIST(nn.Linear(2, 7), FixedTemperature(4.0), options=DIST.Options(),
                  loss=LossConfig(ce_weight=1.0, kd_weight=0.0), setup=MethodSetup([], [], 7, torch.zeros(0), seed=0))
    batch = Batch(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.arange(3), 5)
    term = method.loss_terms(StepInputs(batch, local["s"], [], TeacherOutput(local["t"]), local["tau"], STEP))
    whole_s, whole_tau = student.clone().requires_grad_(True), tau.clone().requires_grad_(True)
    expected = dist_loss(whole_s, teacher, whole_tau)
    assert term["loss_dist"].item() == pytest.approx(expected.item(), rel=REL)
    assert expected.item() != pytest.approx(dist_loss(student[:3], teacher[:3], tau[:3]).item(), rel=1e-3)
    term["loss_dist"].backward()
    expected.backward()
    assert_entrywise_close(local["s"].grad, whole_s.grad[:3], rtol=1e-5, atol=1e-8)
    assert_entrywise_close(local["tau"].grad, whole_tau.grad[:3], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------ LS reference
def _zscore(row: list[float]) -> list[float]:
    """The LS repo's normalize: (z − mean) / (1e-7 + std), torch's default (unbiased, C − 1) std."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
    return [(x - mean) / (1e-7 + std) for x in row]


def ls_kd_reference(student: list, teacher: list, taus: list[float]) -> float:
    """KD on standardised logits (Sun et al.): mean_i τ_i²·KL(softmax(ẑ_t,i/τ_i) ‖ softmax(ẑ_s,i/τ_i)), float64."""
    total = 0.0
    for s, t, tau in zip(student, teacher, taus):
        p_s, p_t = _softmax(_zscore(s), tau), _softmax(_zscore(t), tau)
        total += tau**2 * sum(q * math.log(q / p) for p, q in zip(p_s, p_t))
    return total / len(student)


def _ls_method(temperature: nn.Module, kd_weight: float = 9.0) -> LS:
    setup = MethodSetup([], [], 7, torch.zeros(0, dtype=torch.long), seed=0)
    return LS(nn.Linear(3, 7), temperature, options=LS.Options(), loss=LossConfig(ce_weight=0.1, kd_weight=kd_weight),
              setup=setup)


# ------------------------------------------------------------------------------------------------ LS: values
def test_standardize_is_the_authors_z_score_in_float64() -> None:
    logits = 5 * randn_seeded(13, 4, 9) + 2
    expected = torch.tensor([_zscore(row) for row in logits.double().tolist()], dtype=torch.float64)
    got = standardize(logits)
    assert got.dtype == torch.float64
    assert_entrywise_close(got, expected, rtol=1e-12, atol=1e-12)
    constant = torch.full((2, 5), 3.0, requires_grad=True)  # std 0: zeros, and a finite gradient
    (standardize(constant) * randn_seeded(14, 2, 5)).sum().backward()
    assert torch.isfinite(constant.grad).all()


@pytest.mark.parametrize("per_sample", [False, True])
def test_ls_kd_term_and_gradient_match_an_independent_float64_formula(per_sample: bool) -> None:
    """The LS repo's recipe: KD weight 9 at base temperature 2 (README: --base-temp 2 --kd-weight 9)."""
    student, teacher = randn_seeded(15, 6, 7).requires_grad_(True), 4 * randn_seeded(16, 6, 7)
    tau = 1 + 4 * torch.rand(6, generator=torch.Generator().manual_seed(17)) if per_sample else torch.tensor(2.0)
    taus = tau.tolist() if per_sample else [2.0] * 6
    term = 9.0 * kd_loss(*_ls_method(FixedTemperature(2.0)).kd_inputs(student, teacher), tau)
    expected = 9.0 * ls_kd_reference(student.tolist(), teacher.tolist(), taus)
    assert expected > 0.05 and term.item() == pytest.approx(expected, rel=REL)
    term.backward()
    numeric = 9.0 * numeric_gradient(lambda s: ls_kd_reference(s, teacher.tolist(), taus), student.detach())
    assert (student.grad.double() - numeric).abs().max() <= 1e-5 * numeric.abs().max()


def test_ls_ignores_the_scale_and_shift_of_each_sample_where_plain_kd_does_not() -> None:
    """The point of logit standardisation: a student whose logits are a·z_t + b (a > 0) matches the teacher."""
    teacher = 4 * randn_seeded(18, 8, 10)
    student = 0.3 * teacher + randn_seeded(19, 8, 1)  # a smaller range per sample, shifted
    method = _ls_method(FixedTemperature(2.0))
    assert kd_loss(*method.kd_inputs(student, teacher), 2.0).item() == pytest.approx(0.0, abs=1e-9)
    assert kd_loss(student, teacher, 2.0).item() > 0.5


def test_ls_passes_raw_logits_to_the_temperature_and_a_learned_tau_gets_its_gradient() -> None:
    seen: dict[str, Tensor] = {}

    class Spy(GlobalTemperature):
        def forward(self, student_logits: Tensor, teacher_logits: Tensor, grl_lambda: float) -> Tensor:
            seen["student"], seen["teacher"] = student_logits, teacher_logits
            return super().forward(student_logits, teacher_logits, grl_lambda)

    method = _ls_method(Spy())
    images, teacher_logits = randn_seeded(20, 5, 3), 3 * randn_seeded(21, 5, 7)
    out = method(Batch(images, torch.arange(5) % 7, torch.arange(5), 5), TeacherOutput(teacher_logits), STEP)
    assert torch.equal(seen["student"], out.logits) and torch.equal(seen["teacher"], teacher_logits)
    tau = out.stats["tau"]
    expected = 9.0 * kd_loss(standardize(out.logits.detach()), standardize(teacher_logits), tau)
    assert out.losses["loss_kd"].item() == pytest.approx(expected.item(), rel=REL)
    out.losses["loss_kd"].backward()
    assert torch.isfinite(method.temperature.raw.grad) and method.temperature.raw.grad.abs() > 0


# ------------------------------------------------------------------------------------------------ real distillers
def _real_distiller(options: object, loss: LossConfig, temperature: nn.Module,
                    student_name: str = "resnet8") -> tuple[Distiller, Batch]:
    """resnet14 → `student_name` (10 classes) and one batch of 32×32 images."""
    torch.manual_seed(0)
    student, teacher = models.build_model(student_name, num_classes=10), models.build_model("resnet14", num_classes=10)
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=10,
                          train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=False)
    distiller = build_distiller(options, student=student, teacher=teacher, temperature=temperature, loss=loss,
                                setup=setup)
    distiller.train()
    return distiller, Batch(randn_seeded(22, 6, 3, 32, 32), torch.arange(6) % 10, torch.arange(6), 6)


CASES = {  # method → (options, loss weights of its recipe, the term it adds)
    "dist": (DIST.Options(), LossConfig(ce_weight=1.0, kd_weight=0.0), "loss_dist"),
    "ls": (LS.Options(), LossConfig(ce_weight=0.1, kd_weight=9.0), "loss_kd"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("temperature", ["global", "instance"])
def test_one_step_moves_the_student_and_the_learned_tau_never_the_teacher(name: str, temperature: str) -> None:
    options, loss, key = CASES[name]
    tau_module = GlobalTemperature() if temperature == "global" else InstanceTemperature(num_classes=10)
    distiller, batch = _real_distiller(options, loss, tau_module)
    out = distiller(batch, STEP)
    assert set(out.losses) == {"loss_ce", key}
    assert torch.isfinite(out.losses[key]) and out.losses[key].item() > 0
    method = distiller.unwrapped
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    out.losses[key].backward()  # the method's own term alone reaches the student and τ
    torch.optim.SGD(method.parameters(), lr=0.1).step()
    moved = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    assert "student.conv1.weight" in moved and any(n.startswith("temperature.") for n in moved)
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_torchvision_student_serves_the_logit_methods(name: str) -> None:
    options, loss, key = CASES[name]
    distiller, batch = _real_distiller(options, loss, GlobalTemperature(), "torchvision.resnet18")
    term = distiller(batch, STEP).losses[key]
    term.backward()
    assert torch.isfinite(term) and distiller.student.conv1.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ options and runs
def test_option_defaults_and_checks(tmp_path: Path) -> None:
    assert (DIST.Options().weight, DIST.Options().beta, DIST.Options().gamma) == (1.0, 2.0, 2.0)
    assert DIST.uses_tau and not LS.uses_tau and LS.Options().eps == 1e-7
    for method, key in [("dist", "beta"), ("dist", "gamma"), ("dist", "weight"), ("ls", "eps")]:
        path = write_yaml(tmp_path / f"{method}_{key}.yaml", {"method": {"name": method, key: -1}})
        with pytest.raises(ConfigError, match=rf"method\.{key}"):
            load_config(path)


def test_a_learned_tau_needs_the_kd_term_for_ls_but_not_for_dist(tmp_path: Path, teacher_file: Path) -> None:
    """LS is the KD term: with loss.kd_weight 0 a learned τ would reach nothing; DIST softens with τ itself."""
    for name, ok in (("ls", False), ("dist", True)):
        data = ctkd_config(tmp_path, teacher_file, name, loss={"ce_weight": 1.0, "kd_weight": 0.0})
        data["method"] = {"name": name}
        if ok:
            load(data, tmp_path, f"{name}.yaml")
        else:
            with pytest.raises(ConfigError, match=r"loss\.kd_weight"):
                load(data, tmp_path, f"{name}.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_one_epoch_ctkd_run_logs_a_finite_method_loss(tmp_path: Path, teacher_file: Path, name: str) -> None:
    options, loss, key = CASES[name]
    record = one_epoch_record(tmp_path, teacher_file, {"name": name},
                              loss={"ce_weight": loss.ce_weight, "kd_weight": loss.kd_weight})
    assert math.isfinite(record[f"train_{key}"]) and record[f"train_{key}"] > 0
    assert ("train_loss_kd" in record) == (name == "ls")
    assert math.isfinite(record["tau_mean"]) and 1.0 < record["tau_mean"] < 21.0
