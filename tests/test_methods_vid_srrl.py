"""VID and SRRL: losses against independent float64 formulas, where gradients go, the batch check, end-to-end runs.

VID (Ahn et al., CVPR 2019): the negative log-likelihood of the teacher's map t under a Gaussian whose mean μ(s) is
regressed from the student's map and whose variance is one learned value per channel, σ²_c = softplus(α_c) + ε
(the authors' heteroscedastic parameterisation): −log q(t | s) = Σ 0.5·((t − μ)²/σ² + log σ²) + const.
SRRL (Yang et al., ICLR 2021): MSE of the connected student feature against the teacher's pooled feature, plus MSE of
the teacher's classifier applied to that feature against the teacher's logits.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ctkd.models as models
from conftest import block_mean, ctkd_config, load, randn_seeded, random_maps
from ctkd.build import build_split, build_split_loader
from ctkd.config import ConfigError, LossConfig
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.distributed import DistributedContext
from ctkd.methods import MethodSetup, StepContext, TeacherOutput
from ctkd.methods.base import StepInputs
from ctkd.methods.srrl import SRRL
from ctkd.methods.vid import VID
from ctkd.temperatures import FixedTemperature, GlobalTemperature

STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
TAU = torch.tensor(4.0)


def _setup(student: list[tuple[int, ...]], teacher: list[tuple[int, ...]]) -> MethodSetup:
    return MethodSetup(student, teacher, 10, torch.zeros(0, dtype=torch.long), seed=0)


def _method(cls: type, options: object, setup: MethodSetup) -> nn.Module:
    """A method around a stand-in student (the loss terms are called directly with given features)."""
    return cls(nn.Linear(2, 10), FixedTemperature(4.0), options=options, loss=LossConfig(), setup=setup)


def _batch(n: int) -> Batch:
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n), n)


# ------------------------------------------------------------------------------------------------ VID
# Student / teacher features: stem, three stage outputs (the teacher has four: the zip drops its last), pooled vector.
# Pair 1 has equal sizes, pair 2 a larger student map (8×8 → 4×4), pair 3 a larger teacher map (4×4 → 2×2).
VID_STUDENT = [(3, 8, 8), (4, 8, 8), (5, 8, 8), (6, 2, 2), (6,)]
VID_TEACHER = [(3, 8, 8), (7, 8, 8), (8, 4, 4), (9, 4, 4), (2, 2, 2), (9,)]


def _vid_reference(method: VID, student: list[Tensor], teacher: list[Tensor], eps: float) -> float:
    """Σ_pairs mean 0.5·((t − μ)²/σ² + log σ²) in float64, with μ the three 1×1 convs as channel matrix products."""
    total = 0.0
    for s, t, regressor, log_scale in zip(student[1:-1], teacher[1:-1], method.regressors, method.log_scales):
        s, t = s.double(), t.double()
        size = min(s.shape[-1], t.shape[-1])
        s, t = block_mean(s, size), block_mean(t, size)
        w1, w2, w3 = (conv.weight.detach().double()[:, :, 0, 0] for conv in (regressor[0], regressor[2], regressor[4]))
        mu = torch.einsum("oc,bchw->bohw", w1, s).clamp(min=0)
        mu = torch.einsum("oc,bchw->bohw", w2, mu).clamp(min=0)
        mu = torch.einsum("oc,bchw->bohw", w3, mu)
        var = (torch.log1p(torch.exp(log_scale.detach().double())) + eps)[None, :, None, None]
        total += (0.5 * ((t - mu) ** 2 / var + torch.log(var))).mean().item()
    return total


@pytest.mark.parametrize("init_pred_var", [5.0, 0.5, 80.0])
def test_vid_initial_variance_is_init_pred_var(init_pred_var: float) -> None:
    method = _method(VID, VID.Options(init_pred_var=init_pred_var), _setup(VID_STUDENT, VID_TEACHER))
    assert len(method.log_scales) == 3 and [p.shape for p in method.log_scales] == [(7,), (8,), (9,)]
    expected_log_scale = math.log(math.exp(init_pred_var - 1e-5) - 1)  # softplus⁻¹(σ²₀ − ε), as the authors
    for log_scale, var in zip(method.log_scales, method.variances()):
        assert torch.allclose(log_scale.detach().double(), torch.tensor(expected_log_scale, dtype=torch.float64))
        assert torch.allclose(var.double(), torch.tensor(init_pred_var, dtype=torch.float64), rtol=1e-6)


def test_vid_rejects_an_initial_variance_below_the_floor() -> None:
    with pytest.raises(ConfigError, match="init_pred_var"):
        VID.Options(init_pred_var=1e-6, eps=1e-5)


def test_vid_loss_matches_float64_gaussian_nll() -> None:
    torch.manual_seed(0)
    method = _method(VID, VID.Options(weight=0.7, eps=1e-3), _setup(VID_STUDENT, VID_TEACHER))
    with torch.no_grad():  # per-channel variances that differ, so a mix-up of channels or pairs shows
        for i, log_scale in enumerate(method.log_scales):
            log_scale.copy_(randn_seeded(20 + i, log_scale.shape[0]))
    student, teacher = random_maps(VID_STUDENT, 0), random_maps(VID_TEACHER, 10)
    got = method.loss_terms(StepInputs(_batch(3), None, student, TeacherOutput(None, teacher), TAU, STEP, None))
    assert list(got) == ["loss_vid"] and got["loss_vid"].dtype == torch.float32
    expected = 0.7 * _vid_reference(method, student, teacher, eps=1e-3)
    assert got["loss_vid"].item() == pytest.approx(expected, rel=1e-5)


def test_vid_pools_the_larger_map_to_the_smaller_size() -> None:
    """Student 8×8 vs teacher 4×4 equals feeding the student pre-pooled; teacher 4×4 vs student 2×2 likewise."""
    torch.manual_seed(0)
    method = _method(VID, VID.Options(), _setup(VID_STUDENT, VID_TEACHER))
    student, teacher = random_maps(VID_STUDENT, 0), random_maps(VID_TEACHER, 10)
    pooled_student, pooled_teacher = list(student), list(teacher)
    pooled_student[2] = block_mean(student[2], 4)  # pair 2: the student's map is the larger
    pooled_teacher[3] = block_mean(teacher[3], 2)  # pair 3: the teacher's map is the larger
    terms = [method.loss_terms(StepInputs(_batch(3), None, s, TeacherOutput(None, t), TAU, STEP, None))["loss_vid"]
             for s, t in ((student, teacher), (pooled_student, pooled_teacher))]
    assert terms[0].item() == pytest.approx(terms[1].item(), rel=1e-6)
    nearest = list(teacher)  # control: any other reduction of the teacher's map changes the value
    nearest[3] = teacher[3][:, :, ::2, ::2]
    step = StepInputs(_batch(3), None, student, TeacherOutput(None, nearest), TAU, STEP, None)
    other = method.loss_terms(step)["loss_vid"]
    assert abs(other.item() - terms[0].item()) > 1e-3


def _real_distiller(options: object, batch: int = 4) -> tuple[Distiller, Batch]:
    """resnet14 → resnet8 with 10 classes and one random batch of 32×32 images."""
    torch.manual_seed(0)
    student = models.build_model("resnet8", num_classes=10)
    teacher = models.build_model("resnet14", num_classes=10)
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=10,
                          train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=True)
    distiller = build_distiller(options, student=student, teacher=teacher, temperature=GlobalTemperature(),
                                loss=LossConfig(), setup=setup)
    distiller.train()
    images = randn_seeded(1, batch, 3, 32, 32)
    return distiller, Batch(images, torch.arange(batch) % 10, torch.arange(batch), batch)


def test_vid_heads_are_trainable_state_and_get_gradients_but_the_teacher_none() -> None:
    distiller, batch = _real_distiller(VID.Options())
    method = distiller.unwrapped
    keys = set(method.state_dict())
    head_keys = {k for k in keys if not k.startswith(("student.", "temperature."))}
    assert head_keys == {f"regressors.{i}.{j}.weight" for i in range(3) for j in (0, 2, 4)} | {
        f"log_scales.{i}" for i in range(3)}
    assert [method.regressors[i][0].weight.shape[:2] for i in range(3)] == [(16, 16), (32, 32), (64, 64)]
    out = distiller(batch, STEP)
    assert torch.isfinite(out.losses["loss_vid"])
    sum(out.losses.values()).backward()
    for name, p in method.named_parameters():
        if not name.startswith("temperature."):  # τ only sees the KD term's reversed gradient
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in distiller.teacher.parameters())


# ------------------------------------------------------------------------------------------------ SRRL
def _teacher_classifier(dim: int = 256, classes: int = 100) -> nn.Linear:
    torch.manual_seed(5)
    return nn.Linear(dim, classes)


def _srrl_reference(method: SRRL, classifier: nn.Linear, fs: Tensor, ft: Tensor, zt: Tensor) -> Tensor:
    """Both MSEs in float64 with autograd on a copy of the connector: conv as a matrix, BN on batch statistics."""
    conv, bn = method.connector[0], method.connector[1]
    w = conv.weight.detach().double()[:, :, 0, 0].requires_grad_()
    y = fs.double() @ w.T
    y = (y - y.mean(0)) / torch.sqrt(y.var(0, unbiased=False) + bn.eps)  # training mode: biased batch variance
    y = (y * bn.weight.detach().double() + bn.bias.detach().double()).clamp(min=0)
    z = y @ classifier.weight.detach().double().T + classifier.bias.detach().double()
    loss = ((y - ft.double()) ** 2).mean() + ((z - zt.double()) ** 2).mean()
    loss.backward()
    return loss.detach(), w.grad


def test_srrl_loss_and_connector_gradient_match_float64_formula(golden) -> None:
    data = golden.loss_inputs()
    fs, ft, zt = data["feat_student"], data["feat_teacher"], data["teacher_logits"]
    torch.manual_seed(0)
    method = _method(SRRL, SRRL.Options(weight=0.6), _setup([(64,)], [(256,)]))
    with torch.no_grad():  # a non-trivial BN affine, so the formula's BN is really checked
        method.connector[1].weight.copy_(1 + 0.2 * randn_seeded(30, 256))
        method.connector[1].bias.copy_(0.3 * randn_seeded(31, 256))
    classifier = _teacher_classifier().requires_grad_(False)
    method.train()
    got = method.loss_terms(StepInputs(_batch(16), None, [fs], TeacherOutput(zt, [ft], classifier), TAU, STEP, None))
    assert list(got) == ["loss_srrl"]
    expected, grad = _srrl_reference(method, classifier, fs, ft, zt)
    assert got["loss_srrl"].item() == pytest.approx(0.6 * expected.item(), rel=1e-5)
    got["loss_srrl"].backward()
    # the logit term's gradient passes through the teacher's classifier into the connector
    diff = method.connector[0].weight.grad[:, :, 0, 0].double() - 0.6 * grad
    assert diff.abs().max() < 1e-5 * grad.abs().max()


@pytest.mark.parametrize("frozen", [True, False])
def test_srrl_never_accumulates_gradient_in_the_teacher_classifier(frozen: bool) -> None:
    """Frozen (as the distiller leaves it) or not (the authors' teacher): its .grad stays None."""
    method = _method(SRRL, SRRL.Options(), _setup([(64,)], [(256,)]))
    classifier = _teacher_classifier().requires_grad_(not frozen)
    fs, ft, zt = randn_seeded(1, 8, 64).requires_grad_(), randn_seeded(2, 8, 256), randn_seeded(3, 8, 100)
    method.train()
    step = StepInputs(_batch(8), None, [fs], TeacherOutput(zt, [ft], classifier), TAU, STEP, None)
    loss = method.loss_terms(step)["loss_srrl"]
    loss.backward()
    assert classifier.weight.grad is None and classifier.bias.grad is None
    assert fs.grad is not None and fs.grad.abs().sum() > 0  # into the student's pooled feature
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.connector.parameters())


def test_srrl_in_a_real_distiller_trains_the_connector_and_student_only() -> None:
    distiller, batch = _real_distiller(SRRL.Options())
    method = distiller.unwrapped
    head_keys = {k for k in method.state_dict() if not k.startswith(("student.", "temperature."))}
    assert head_keys == {"connector.0.weight", "connector.1.weight", "connector.1.bias", "connector.1.running_mean",
                         "connector.1.running_var", "connector.1.num_batches_tracked"}
    assert method.connector[0].weight.shape == (64, 64, 1, 1)
    out = distiller(batch, STEP)
    sum(out.losses.values()).backward()
    assert method.connector[0].weight.grad.abs().sum() > 0 and method.student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())


def _batch_check_config(tmp_path: Path, teacher_file: Path, method: str, train_size: int) -> object:
    data = ctkd_config(tmp_path, teacher_file, method, epochs=1)
    data["method"] = {"name": method}
    data["data"]["train_size"] = train_size
    return load(data, tmp_path, f"{method}.yaml")


def test_srrl_refuses_a_last_batch_of_one_sample(tmp_path: Path, teacher_file: Path) -> None:
    """161 % 32 = 1: the connector's BatchNorm cannot train on one sample; KD takes that batch, and SRRL 162."""
    srrl = _batch_check_config(tmp_path, teacher_file, "srrl", 161)
    with pytest.raises(ConfigError, match="srrl"):
        build_split_loader(srrl, build_split(srrl, train=True), train=True, ctx=DistributedContext())
    kd = _batch_check_config(tmp_path, teacher_file, "kd", 161)
    assert len(build_split_loader(kd, build_split(kd, train=True), train=True, ctx=DistributedContext())) == 6
    srrl = _batch_check_config(tmp_path, teacher_file, "srrl", 162)
    assert len(build_split_loader(srrl, build_split(srrl, train=True), train=True, ctx=DistributedContext())) == 6


# ------------------------------------------------------------------------------------------------ end to end


