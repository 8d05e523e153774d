"""FSP (Yim et al., CVPR 2017) as RepDistiller trains it: the loss and its gradients against an independent float64
formula, the invariants, the init stage on real zoo and torchvision models, the pairing error and a run.

The formula (RepDistiller distiller_zoo/FSP.py): for consecutive maps F1 (C1×H×W) and F2 (C2×H×W) of one network,
the larger average-pooled to the smaller's size, G[b, i, j] = (1/HW) Σ_hw F2[b,i,h,w]·F1[b,j,h,w] (a C2×C1 matrix);
the loss is Σ_pairs mean_{b,i,j} (G_s − G_t)² (every λ_i = 1; RepDistiller's `.mean()` where the paper sums).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

import ctkd.models as models
from conftest import ctkd_config, load
from ctkd.config import ConfigError, LossConfig
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.distributed import DistributedContext
from ctkd.guard import NonFiniteGuard
from ctkd.methods import METHODS, MethodSetup, Stage, StepContext, TeacherOutput
from ctkd.methods.base import StepInputs
from ctkd.methods.fsp import FSP, fsp_loss
from ctkd.stages import ActiveStage
from ctkd.step import train_step
from ctkd.temperatures import FixedTemperature, GlobalTemperature
from ctkd.trainer import run

pytestmark = pytest.mark.usefixtures("single_thread")

STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
# stem and three stage outputs (then the pooled vector): the teacher's pair 1 has a larger bottom map (16 → 8), its
# pair 2 a larger top map (16 → 8); the student's pair 2 a larger bottom map (8 → 4)
STUDENT = [(3, 8, 8), (5, 8, 8), (6, 4, 4), (6,)]
TEACHER = [(3, 16, 16), (5, 8, 8), (6, 16, 16), (9,)]


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _maps(shapes: list[tuple[int, ...]], seed: int, batch: int = 3) -> list[Tensor]:
    return [_randn(seed + i, batch, *shape) for i, shape in enumerate(shapes)]


def _block_mean(x: Tensor, size: int) -> Tensor:
    """Average of non-overlapping blocks down to size×size (written out, not adaptive_avg_pool2d)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def _reference(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """The module docstring's formula in float64, one matrix entry at a time over channel pairs."""
    def matrices(maps: list[Tensor]) -> list[Tensor]:
        out = []
        for bottom, top in zip(maps[:-1], maps[1:]):
            size = min(bottom.shape[-1], top.shape[-1])
            bottom, top = _block_mean(bottom.double(), size), _block_mean(top.double(), size)
            rows = [torch.stack([(top[:, i] * bottom[:, j]).sum(dim=(1, 2)) / size**2
                                 for j in range(bottom.shape[1])], dim=1) for i in range(top.shape[1])]
            out.append(torch.stack(rows, dim=1))  # (B, C_top, C_bottom)
        return out

    return sum(((s - t) ** 2).mean() for s, t in zip(matrices(student), matrices(teacher)))


def _setup(student: list[tuple[int, ...]], teacher: list[tuple[int, ...]]) -> MethodSetup:
    return MethodSetup(student, teacher, 10, torch.zeros(0, dtype=torch.long), seed=0)


def _method(options: FSP.Options, student: list = STUDENT, teacher: list = TEACHER) -> FSP:
    return FSP(nn.Linear(2, 10), FixedTemperature(4.0), options=options, loss=LossConfig(),
               setup=_setup(student, teacher))


def _step(student: list[Tensor], teacher: list[Tensor]) -> StepInputs:
    n = student[0].shape[0]
    batch = Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n), n)
    return StepInputs(batch, None, student, TeacherOutput(torch.zeros(n, 10), teacher), torch.tensor(4.0), STEP)


# ------------------------------------------------------------------------------------------------ the loss
def test_fsp_loss_and_its_gradients_match_the_float64_formula() -> None:
    student = [m.requires_grad_() for m in _maps(STUDENT[:-1], 10)]
    teacher = _maps(TEACHER[:-1], 20)
    got = fsp_loss(student, teacher)
    got.backward()
    reference = [m.detach().double().requires_grad_() for m in student]
    expected = _reference(reference, teacher)
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for mine, theirs in zip(student, reference):
        assert (mine.grad.double() - theirs.grad).abs().max() < 1e-5 * theirs.grad.abs().max()


def test_the_stage_term_is_the_unweighted_loss_and_distillation_adds_beta_times_it_only_when_asked() -> None:
    """RepDistiller's init sums loss_group without β; its train_distill sets loss_kd = 0 for fsp (β = 0 here)."""
    student, teacher = _maps(STUDENT, 10), _maps(TEACHER, 20)
    expected = _reference(student[:-1], teacher[:-1]).item()
    default = _method(FSP.Options())
    stage = default.stages()[0]
    assert default.stage_loss_terms(stage, _step(student, teacher))["loss_fsp"].item() == pytest.approx(
        expected, rel=1e-5)
    assert default.loss_terms(_step(student, teacher)) == {}
    weighted = _method(FSP.Options(weight=50.0)).loss_terms(_step(student, teacher))["loss_fsp"]
    assert weighted.item() == pytest.approx(50 * expected, rel=1e-5)
    with pytest.raises(NotImplementedError, match="other"):
        default.stage_loss_terms(Stage("other", 1, ("student",), 0.1), _step(student, teacher))


def test_fsp_is_zero_when_the_student_equals_the_teacher_and_sends_no_gradient_to_the_teacher() -> None:
    maps = _maps(STUDENT[:-1], 10)
    student = [m.clone().requires_grad_() for m in maps]
    teacher = [m.clone().requires_grad_() for m in maps]  # as if the teacher's maps carried a graph
    loss = fsp_loss(student, teacher)
    assert loss.item() == 0.0
    fsp_loss(student, [t * 1.5 for t in teacher]).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)


def test_options_and_the_init_stage_default_to_repdistillers() -> None:
    options = FSP.Options()
    assert (options.weight, options.init_epochs, options.init_lr) == (0.0, 30, 0.05)
    assert METHODS.get("fsp") is FSP and FSP.features and not FSP.preact and FSP.paper == "Yim et al., CVPR 2017"
    # RepDistiller init(): optim.SGD(model_s.get_feat_modules(), lr=0.05, momentum=0.9, weight_decay=5e-4), 30 epochs
    assert _method(options).stages() == [Stage("fsp_init", 30, ("student",), 0.05, 0.9, 5e-4)]
    assert _method(FSP.Options(init_epochs=0)).stages() == []


@pytest.mark.parametrize("student, teacher, message", [
    ([(3, 8, 8), (5, 8, 8), (6,)], [(3, 8, 8), (7, 8, 8), (6,)], r"channels 3, 5, teacher .* channels 3, 7"),
    ([(3, 8, 8), (5, 8, 8), (6,)], [(3, 8, 8), (5, 8, 8), (5, 4, 4), (6,)], r"2 maps .* 3 maps"),
    ([(3, 8, 8), (6,)], [(3, 8, 8), (6,)], r"1 maps"),
    ([(8, 2, 2), (32,)], [(3, 8, 8), (6,)], r"1 maps"),
])
def test_maps_that_cannot_pair_are_a_config_error(student: list, teacher: list, message: str) -> None:
    with pytest.raises(ConfigError, match=r"method fsp .*student Linear .*" + message):
        _method(FSP.Options(), student, teacher)


# ------------------------------------------------------------------------------------------------ real networks
def _distiller(student_name: str, teacher_name: str, options: FSP.Options) -> tuple[Distiller, Batch]:
    """`teacher_name` → `student_name` with 10 classes and one random batch of four 32×32 images."""
    torch.manual_seed(0)
    student = models.build_model(student_name, num_classes=10)
    teacher = models.build_model(teacher_name, num_classes=10)
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=10,
                          train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=True)
    distiller = build_distiller(options, student=student, teacher=teacher, temperature=GlobalTemperature(),
                                loss=LossConfig(), setup=setup)
    return distiller, Batch(_randn(1, 4, 3, 32, 32), torch.arange(4), torch.arange(4), 4)


def _stage_step(distiller: Distiller, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One step of the init stage as a run takes it (ctkd.stages); returns its terms and the state before it."""
    before = {k: v.clone() for k, v in distiller.unwrapped.state_dict().items()}
    exp = SimpleNamespace(distiller=distiller, device=torch.device("cpu"), ctx=DistributedContext())
    stage = distiller.unwrapped.stages()[0]
    with ActiveStage(exp, 0, stage, sgd="fused", fp16=False) as active:
        epoch = active.epoch(1)
        epoch.set_modes()
        guard = NonFiniteGuard(torch.device("cpu"), 0)
        out = train_step(None, batch, StepContext(1, 0, torch.tensor(0.0)), guard, epoch.recipe)
        guard.check()
    return out.losses, before


@pytest.mark.slow  # its first stage SGD imports torch._dynamo (seconds, once per process)
def test_the_init_stage_moves_the_students_feature_layers_only() -> None:
    """resnet14 → resnet8 (channels 16, 16, 32, 64 both): the FSP loss alone; the classifier gets no gradient (as
    RepDistiller's get_feat_modules leaves it out), τ and the teacher stay."""
    distiller, batch = _distiller("resnet8", "resnet14", FSP.Options())
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    terms, before = _stage_step(distiller, batch)
    assert list(terms) == ["loss_fsp"] and math.isfinite(terms["loss_fsp"].item()) and terms["loss_fsp"] > 0
    after = distiller.unwrapped.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert "student.conv1.weight" in moved and "student.layer3.0.conv2.weight" in moved
    assert not moved & {"student.fc.weight", "student.fc.bias", "temperature.raw"}
    assert all(torch.equal(v, distiller.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(p.requires_grad for p in distiller.unwrapped.parameters())  # given back after the stage


def test_a_distillation_step_is_finite_moves_the_student_and_gives_tau_a_gradient() -> None:
    distiller, batch = _distiller("resnet8", "resnet14", FSP.Options(weight=50.0))
    distiller.train()
    out = distiller(batch, STEP)
    assert set(out.losses) == {"loss_ce", "loss_kd", "loss_fsp"}
    assert all(math.isfinite(v.item()) for v in out.losses.values())
    sum(out.losses.values()).backward()
    method = distiller.unwrapped
    assert method.student.conv1.weight.grad.abs().sum() > 0 and method.temperature.raw.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.slow
def test_a_torchvision_student_trains_its_init_stage_against_a_torchvision_teacher() -> None:
    """torchvision.resnet18 on 32×32 (stem and four stages: 64, 64, 128, 256, 512 channels both)."""
    distiller, batch = _distiller("torchvision.resnet18", "torchvision.resnet18", FSP.Options())
    terms, before = _stage_step(distiller, batch)
    assert math.isfinite(terms["loss_fsp"].item())
    after = distiller.unwrapped.state_dict()
    assert not torch.equal(before["student.conv1.weight"], after["student.conv1.weight"])
    assert torch.equal(before["student.fc.weight"], after["student.fc.weight"])


def test_a_torchvision_student_with_a_cifar_teacher_is_refused_naming_both() -> None:
    torch.manual_seed(0)
    student = models.build_model("torchvision.resnet18", num_classes=10)
    teacher = models.build_model("resnet14", num_classes=10)
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=10,
                          train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=True)
    with pytest.raises(ConfigError, match=r"student ResNet has 5 maps of channels 64, 64, 128, 256, 512, teacher "
                                          r"CifarResNet 4 maps of channels 16, 16, 32, 64"):
        build_distiller(FSP.Options(), student=student, teacher=teacher, temperature=GlobalTemperature(),
                        loss=LossConfig(), setup=setup)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_tiny_fsp_run_logs_its_stage_and_then_distils(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file, "fsp", epochs=1, method={"name": "fsp", "init_epochs": 1}),
               tmp_path)
    results = run(cfg)
    records = [json.loads(line) for line in (tmp_path / "fsp" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r.get("stage")) for r in records] == [(0, "fsp_init"), (1, None)]
    assert math.isfinite(records[0]["train_loss_fsp"]) and records[0]["train_loss_fsp"] > 0
    assert "train_loss_fsp" not in records[1] and math.isfinite(records[1]["train_loss"])  # β = 0: CE + KD
    assert results["epochs"] == 1 and results["stage_epochs"] == {"fsp_init": 1}
