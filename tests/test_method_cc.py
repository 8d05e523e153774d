"""CC (Peng et al., ICCV 2019): loss and gradient against float64 formulas, invariants, the global batch under DDP,
real distillers (zoo and torchvision students), options and an end-to-end run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import ctkd.methods.base as methods_base
import ctkd.models as models
from conftest import assert_entrywise_close, numeric_gradient, one_epoch_record, randn_seeded, write_yaml
from ctkd.config import ConfigError, LossConfig, load_config
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.methods import MethodSetup, StepContext, TeacherOutput
from ctkd.methods.base import StepInputs
from ctkd.methods.cc import CC, cc_loss, rbf_correlation
from ctkd.temperatures import FixedTemperature

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny forwards: one torch thread
STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
REL = 1e-5
GAMMA, ORDER = 0.4, 2  # the RBF settings of Knowledge-Distillation-Zoo's CC (--gamma 0.4 --P_order 2)


# ------------------------------------------------------------------------------------------------ references
def _unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in row))
    return [x / norm for x in row]


def rbf_reference(student: list[list[float]], teacher: list[list[float]], gamma: float, order: int) -> float:
    """The CC paper's correlation congruence, 1/n² Σ_ij (k(t_i, t_j) − k(s_i, s_j))², with the Gaussian RBF kernel
    exp(−γ‖x − y‖²) on L2-normalised embeddings, Taylor-expanded to order P around x·y: for unit vectors
    ‖x − y‖² = 2 − 2x·y, so k = e^{−2γ} Σ_{p ≤ P} (2γ x·y)^p / p!. Plain float64 loops."""
    def kernel(rows: list[list[float]], i: int, j: int) -> float:
        dot = sum(a * b for a, b in zip(_unit(rows[i]), _unit(rows[j])))
        return math.exp(-2 * gamma) * sum((2 * gamma * dot) ** p / math.factorial(p) for p in range(order + 1))

    n = len(student)
    return sum((kernel(teacher, i, j) - kernel(student, i, j)) ** 2 for i in range(n) for j in range(n)) / n**2


def repdistiller_reference(student: list[list[float]], teacher: list[list[float]]) -> float:
    """RepDistiller's Correlation (distiller_zoo/CC.py): δ = |f_s − f_t|, mean over i < B−1 of Σ_d δ_i,d · δ_i+1,d."""
    delta = [[abs(a - b) for a, b in zip(s, t)] for s, t in zip(student, teacher)]
    return sum(sum(a * b for a, b in zip(delta[i], delta[i + 1])) for i in range(len(delta) - 1)) / (len(delta) - 1)


# ------------------------------------------------------------------------------------------------ 1. values, gradients
@pytest.mark.parametrize("gamma,order", [(GAMMA, ORDER), (1.0, 3), (0.2, 0)])
def test_rbf_loss_and_gradient_match_an_independent_float64_formula(gamma: float, order: int) -> None:
    student, teacher = randn_seeded(1, 6, 5).double().requires_grad_(True), 3 * randn_seeded(2, 6, 5)
    ours = cc_loss(student, teacher, "rbf", gamma, order)
    expected = rbf_reference(student.tolist(), teacher.tolist(), gamma, order)
    assert expected > 1e-4 or order == 0  # order 0: k = e^{−2γ} everywhere, so student and teacher always agree
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(expected, rel=REL, abs=1e-12)
    ours.backward()
    numeric = numeric_gradient(lambda s: rbf_reference(s, teacher.tolist(), gamma, order), student.detach())
    assert (student.grad - numeric).abs().max() <= 1e-5 * numeric.abs().max() + 1e-12


def test_rbf_correlation_converges_to_the_gaussian_kernel_with_the_taylor_order() -> None:
    """Order 30 is the Gaussian exp(−γ‖x̂ − ŷ‖²) of the normalised rows to float64 rounding; order 2 is not."""
    x = randn_seeded(3, 5, 7).double()
    unit = x / x.norm(dim=1, keepdim=True)
    exact = torch.exp(-GAMMA * torch.cdist(unit, unit) ** 2)
    assert (rbf_correlation(x, GAMMA, 30) - exact).abs().max() < 1e-12
    assert (rbf_correlation(x, GAMMA, ORDER) - exact).abs().max() > 1e-3


def test_repdistiller_kernel_matches_their_formula_and_its_gradient() -> None:
    student, teacher = randn_seeded(4, 5, 8).double().requires_grad_(True), randn_seeded(5, 5, 8)
    ours = cc_loss(student, teacher, "repdistiller")
    assert ours.item() == pytest.approx(repdistiller_reference(student.tolist(), teacher.tolist()), rel=REL)
    ours.backward()
    numeric = numeric_gradient(lambda s: repdistiller_reference(s, teacher.tolist()), student.detach())
    assert (student.grad - numeric).abs().max() <= 1e-5 * numeric.abs().max()
    # a one-sample batch has no consecutive pair: 0, not the mean of nothing
    assert cc_loss(student[:1], teacher[:1], "repdistiller").item() == 0.0


# ------------------------------------------------------------------------------------------------ 2. invariants
def test_cc_is_zero_when_the_student_embedding_equals_the_teacher_and_rbf_ignores_scale() -> None:
    teacher = randn_seeded(6, 8, 16)
    for kernel in ("rbf", "repdistiller"):
        assert cc_loss(teacher, teacher, kernel).item() == pytest.approx(0.0, abs=1e-12)
        assert cc_loss(randn_seeded(7, 8, 16), teacher, kernel).item() > 1e-4
    # the RBF correlations are of the L2-normalised embeddings: a scaled copy correlates exactly like the teacher
    assert cc_loss(5.0 * teacher, teacher, "rbf").item() == pytest.approx(0.0, abs=1e-12)
    assert cc_loss(5.0 * teacher, teacher, "repdistiller").item() > 1.0


def test_an_all_zero_embedding_row_has_a_finite_gradient() -> None:
    student = randn_seeded(8, 4, 6)
    student[2] = 0.0
    student.requires_grad_(True)
    cc_loss(student, randn_seeded(9, 4, 6)).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ 3. global batch
def _method(kernel: str, student_dim: int = 6, teacher_dim: int = 9) -> CC:
    """A CC method around a stand-in student; loss_terms is called directly with given pooled features."""
    torch.manual_seed(0)
    setup = MethodSetup([(student_dim,)], [(teacher_dim,)], 10, torch.zeros(0, dtype=torch.long), seed=0)
    return CC(torch.nn.Linear(2, 10), FixedTemperature(4.0), options=CC.Options(feat_dim=4, kernel=kernel),
              loss=LossConfig(), setup=setup)


def _embedded(method: CC, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """The two embeddings W·f + b from the heads' weights, in float64 (written out, not the heads' forward)."""
    def embed(head: torch.nn.Linear, f: Tensor) -> Tensor:
        return f.double() @ head.weight.detach().double().T + head.bias.detach().double()
    return embed(method.embed_s, student), embed(method.embed_t, teacher)


@pytest.mark.parametrize("kernel", ["rbf", "repdistiller"])
def test_a_rank_computes_the_loss_and_gradient_of_the_whole_global_batch(kernel: str, monkeypatch) -> None:
    """Rank 0 of 2 holds samples 0-2 of a 5-sample global batch (shards 3 + 2, as the sampler splits it). With the
    gather returning rank 1's rows after its own (what `gather_batch` does, as a concatenation here), the term equals
    the loss of the whole batch — consecutive pairs across the shard boundary included — and the gradient into the
    local rows equals their gradient in the single-process loss (all_gather's backward then sums the ranks' equal
    shares and DDP averages them)."""
    method = _method(kernel)
    student, teacher = randn_seeded(10, 5, 6), randn_seeded(11, 5, 9)
    local_student, local_teacher = student[:3].clone().requires_grad_(True), teacher[:3].clone()

    def gather(x: Tensor, size: int) -> Tensor:
        assert size == 5 and (x is local_student or x is local_teacher)
        return torch.cat([x, student[3:] if x is local_student else teacher[3:]])

    monkeypatch.setattr(methods_base, "gather_batch", gather)
    step = StepInputs(Batch(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.arange(3), 5), None,
                      [local_student], TeacherOutput(torch.zeros(3, 10), [local_teacher]), torch.tensor(4.0), STEP)
    term = method.loss_terms(step)["loss_cc"]
    whole = student.double().requires_grad_(True)
    f_s = whole @ method.embed_s.weight.detach().double().T + method.embed_s.bias.detach().double()
    expected = 0.02 * cc_loss(f_s, _embedded(method, student, teacher)[1].detach(), kernel)
    assert term.item() == pytest.approx(expected.item(), rel=REL)
    assert term.item() != pytest.approx(0.02 * cc_loss(*_embedded(method, student[:3], teacher[:3]), kernel).item(),
                                        rel=1e-3)  # not the loss of the local shard alone
    term.backward()
    expected.backward()
    assert_entrywise_close(local_student.grad.double(), whole.grad[:3], rtol=1e-4, atol=1e-9)


def test_the_loss_of_two_gathered_halves_is_the_loss_of_the_batch() -> None:
    s, t = randn_seeded(12, 8, 4), randn_seeded(13, 8, 4)
    for kernel in ("rbf", "repdistiller"):
        halves = cc_loss(torch.cat([s[:4], s[4:]]), torch.cat([t[:4], t[4:]]), kernel)
        assert halves.item() == cc_loss(s, t, kernel).item()
        assert halves.item() != pytest.approx(cc_loss(s[:4], t[:4], kernel).item(), rel=1e-3)


# ------------------------------------------------------------------------------------------------ 4. real distillers
def _real_distiller(student_name: str = "resnet8", **options: object) -> tuple[Distiller, Batch]:
    """CC distilling resnet14 (10 classes) into `student_name`, and one batch of 32×32 images."""
    torch.manual_seed(0)
    student, teacher = models.build_model(student_name, num_classes=10), models.build_model("resnet14", num_classes=10)
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=10,
                          train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=True)
    distiller = build_distiller(CC.Options(**options), student=student, teacher=teacher,
                                temperature=FixedTemperature(4.0), loss=LossConfig(), setup=setup)
    distiller.train()
    return distiller, Batch(randn_seeded(14, 6, 3, 32, 32), torch.arange(6) % 10, torch.arange(6), 6)


@pytest.mark.parametrize("kernel", ["rbf", "repdistiller"])
def test_one_step_moves_the_student_and_both_heads_never_the_teacher(kernel: str) -> None:
    distiller, batch = _real_distiller(kernel=kernel)
    method = distiller.unwrapped
    heads = {k for k in method.state_dict() if not k.startswith(("student.", "temperature."))}
    assert heads == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    assert method.embed_s.weight.shape == (128, 64) and method.embed_t.weight.shape == (128, 64)
    term = distiller(batch, STEP).losses["loss_cc"]
    assert term.dim() == 0 and torch.isfinite(term) and term.item() > 0
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    term.backward()
    optimizer.step()
    for name in ("student.conv1.weight", "embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"):
        assert not torch.equal(dict(method.named_parameters())[name], before[name]), name
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.slow
def test_a_torchvision_student_serves_cc() -> None:
    """torchvision's resnet18 (forward hooks give its pooled 512-d vector) on 32×32 inputs, 10 classes."""
    distiller, batch = _real_distiller("torchvision.resnet18")
    assert distiller.unwrapped.embed_s.weight.shape == (128, 512)
    term = distiller(batch, STEP).losses["loss_cc"]
    term.backward()
    assert torch.isfinite(term) and distiller.student.conv1.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ 5. options and run
def test_options_follow_repdistiller_and_the_rbf_settings_and_are_checked(tmp_path: Path) -> None:
    options = CC.Options()
    assert (options.weight, options.feat_dim, options.kernel, options.gamma, options.order) == (
        0.02, 128, "rbf", 0.4, 2)
    for key, value, pattern in [("kernel", "gauss", r"method\.kernel.*rbf, repdistiller"),
                                ("weight", -1, r"method\.weight"), ("feat_dim", 0, r"method\.feat_dim"),
                                ("gamma", 0, r"method\.gamma")]:
        path = write_yaml(tmp_path / f"{key}.yaml", {"method": {"name": "cc", key: value}})
        with pytest.raises(ConfigError, match=pattern):
            load_config(path)


@pytest.mark.slow
def test_one_epoch_ctkd_run_logs_a_finite_cc_loss(tmp_path: Path, teacher_file: Path) -> None:
    record = one_epoch_record(tmp_path, teacher_file, {"name": "cc", "weight": 1.0})  # a weight for the RBF's scale
    assert math.isfinite(record["train_loss_cc"]) and record["train_loss_cc"] > 0
    assert math.isfinite(record["train_loss_kd"]) and math.isfinite(record["tau_mean"])
