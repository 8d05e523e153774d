"""FitNet and AT: losses and gradients against independent float64 formulas, shape checks, real networks, runs.

FitNet (Romero et al., ICLR 2015) as RepDistiller trains it: its ConvReg regressor (a conv chosen by the two heights:
3×3 stride 2 padding 1 for a student map twice the teacher's, 4×4 stride-2 padding-1 transposed conv for half of it,
else a (1 + s_H − t_H)×(1 + s_W − t_W) kernel; then BatchNorm, ReLU) and the MSE against the teacher's hint.
AT (Zagoruyko & Komodakis, ICLR 2017): per stage the attention Σ_c |A_c|^p over positions (the paper's F^p_sum,
Eq. 1), L2-normalised, squared differences averaged over batch and positions (the authors' at_loss), summed over
stages; the larger map average-pooled to the smaller size first (RepDistiller).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import (
    block_mean,
    ctkd_config,
    feature_setup,
    feature_step,
    load,
    one_epoch_record,
    randn_seeded,
    random_maps,
    standalone_method,
    zoo_distiller,
)
from ctkd.build import build_split, build_split_loader
from ctkd.config import ConfigError, method_class
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller
from ctkd.distributed import DistributedContext
from ctkd.methods import StepContext
from ctkd.methods.at import AT, at_loss
from ctkd.methods.fitnet import FitNet

pytestmark = pytest.mark.usefixtures("single_thread")

STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
TAU = torch.tensor(4.0)
BN_EPS = 1e-5  # nn.BatchNorm2d's default, which RepDistiller's ConvReg keeps


# ------------------------------------------------------------------------------------------------ FitNet
# (student hint, teacher hint, how RepDistiller's ConvReg maps it, its kernel)
HINT_CASES = [
    ((4, 8, 8), (6, 4, 4), "stride2", (3, 3)),  # s_H = 2·t_H
    ((4, 4, 4), (6, 8, 8), "transpose", (4, 4)),  # 2·s_H = t_H
    ((4, 6, 5), (6, 4, 4), "plain", (3, 2)),  # s ≥ t: kernel 1 + s − t per dimension
    ((4, 4, 4), (6, 4, 4), "plain", (1, 1)),
]


def _hint_features(shape: tuple[int, ...], seed: int, batch: int = 5) -> list[Tensor]:
    """[stem, stage 1, hint (index 2), pooled]: only features[2] matters for FitNet's default hint_layer."""
    return [randn_seeded(seed, batch, 3, 4, 4), randn_seeded(seed + 1, batch, 3, 4, 4),
            randn_seeded(seed + 2, batch, *shape), randn_seeded(seed + 3, batch, 7)]


def _fitnet_reference(method: FitNet, hint: Tensor, target: Tensor, kind: str) -> tuple[float, Tensor]:
    """MSE(ReLU(BN(conv(s))), t) in float64, BN on the batch statistics (training mode), and its gradient in s."""
    conv, bn = method.regressor[0], method.regressor[1]
    s = hint.double().requires_grad_()
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    if kind == "stride2":
        y = F.conv2d(s, w, b, stride=2, padding=1)
    elif kind == "transpose":
        y = F.conv_transpose2d(s, w, b, stride=2, padding=1)
    else:
        y = F.conv2d(s, w, b)
    mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    gamma, beta = (p.detach().double()[None, :, None, None] for p in (bn.weight, bn.bias))
    y = ((y - mean) / torch.sqrt(var + BN_EPS) * gamma + beta).clamp(min=0)
    loss = ((y - target.double()) ** 2).mean()
    loss.backward()
    return loss.item(), s.grad


@pytest.mark.parametrize("student,teacher,kind,kernel", HINT_CASES)
def test_fitnet_loss_and_gradient_match_float64_convreg(student: tuple, teacher: tuple, kind: str,
                                                        kernel: tuple) -> None:
    torch.manual_seed(0)
    method = standalone_method(FitNet, FitNet.Options(weight=3.0), feature_setup(_shapes(student), _shapes(teacher)))
    conv = method.regressor[0]
    assert isinstance(conv, nn.ConvTranspose2d) == (kind == "transpose") and tuple(conv.kernel_size) == kernel
    with torch.no_grad():  # a non-trivial BN affine, so the formula's BN is really checked
        method.regressor[1].weight.copy_(1 + 0.2 * randn_seeded(30, teacher[0]))
        method.regressor[1].bias.copy_(0.3 * randn_seeded(31, teacher[0]))
    s_feats, t_feats = _hint_features(student, 0), _hint_features(teacher, 10)
    s_feats[2].requires_grad_()
    method.train()
    got = method.loss_terms(feature_step(s_feats, t_feats))
    assert list(got) == ["loss_fitnet"] and got["loss_fitnet"].dtype == torch.float32
    expected, grad = _fitnet_reference(method, s_feats[2].detach(), t_feats[2], kind)
    assert got["loss_fitnet"].item() == pytest.approx(3.0 * expected, rel=1e-5)
    got["loss_fitnet"].backward()
    torch.testing.assert_close(s_feats[2].grad.double(), 3.0 * grad, rtol=1e-4, atol=1e-7)


def _shapes(hint: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [(3, 4, 4), (3, 4, 4), hint, (7,)]


@pytest.mark.parametrize("hint_layer,match", [(3, "hint_layer = 3 is out of range"), (9, "hint_layer = 9")])
def test_fitnet_hint_layer_must_name_a_spatial_map(hint_layer: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):  # index 3 is the pooled vector, 9 is past the list
        standalone_method(FitNet, FitNet.Options(hint_layer=hint_layer),
                          feature_setup(_shapes((4, 4, 4)), _shapes((6, 4, 4))))
    method = standalone_method(FitNet, FitNet.Options(hint_layer=1),
                               feature_setup(_shapes((4, 4, 4)), _shapes((6, 4, 4))))
    assert method.regressor[0].in_channels == 3  # features[1] of the stand-in shapes


@pytest.mark.parametrize("student,teacher", [((4, 2, 2), (6, 8, 8)), ((4, 8, 8), (6, 4, 3)), ((4, 3, 6), (6, 4, 4))])
def test_fitnet_rejects_maps_the_regressor_cannot_map(student: tuple, teacher: tuple) -> None:
    """A 4× smaller map, a width that does not halve with the height, a map narrower than the teacher's."""
    with pytest.raises(ConfigError, match=r"method fitnet.*ConvReg"):
        standalone_method(FitNet, FitNet.Options(), feature_setup(_shapes(student), _shapes(teacher)))


def test_option_defaults_follow_repdistiller() -> None:
    assert (FitNet.Options().weight, FitNet.Options().hint_layer) == (100.0, 2)  # -b 100 --hint_layer 2
    assert (AT.Options().weight, AT.Options().p) == (1000.0, 2.0)  # -b 1000, Attention(p=2)
    assert method_class("fitnet") is FitNet and method_class("at") is AT
    assert FitNet.min_samples_per_rank == 2 and AT.min_samples_per_rank == 1  # the regressor's BatchNorm
    with pytest.raises(ConfigError, match="hint_layer"):
        FitNet.Options(hint_layer=-1)


def test_fitnet_refuses_a_last_batch_of_one_sample(tmp_path: Path, teacher_file: Path) -> None:
    """161 % 32 = 1: the regressor's BatchNorm cannot train on one sample; 162 is fine."""
    for size, fails in ((161, True), (162, False)):
        data = ctkd_config(tmp_path, teacher_file, "fitnet", epochs=1)
        data["method"] = {"name": "fitnet"}
        data["data"]["train_size"] = size
        cfg = load(data, tmp_path, f"fitnet{size}.yaml")
        split = build_split(cfg, train=True)
        if fails:
            with pytest.raises(ConfigError, match="fitnet"):
                build_split_loader(cfg, split, train=True, ctx=DistributedContext())
        else:
            assert len(build_split_loader(cfg, split, train=True, ctx=DistributedContext())) == 6


# ------------------------------------------------------------------------------------------------ AT
# Stem, three stage outputs (the teacher has four: the zip drops its last), pooled vector. Pair 1 has equal sizes,
# pair 2 a larger teacher map (8×8 → 4×4), pair 3 a larger student map (4×4 → 2×2).
AT_STUDENT = [(3, 8, 8), (4, 8, 8), (5, 4, 4), (6, 4, 4), (6,)]
AT_TEACHER = [(3, 8, 8), (7, 8, 8), (8, 8, 8), (9, 2, 2), (2, 2, 2), (9,)]


def _at_reference(student: list[Tensor], teacher: list[Tensor], p: float) -> Tensor:
    """Σ_pairs mean over batch and positions of (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)², Q = Σ_c |A_c|^p, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(student[1:-1], teacher[1:-1]):
        size = min(s.shape[-1], t.shape[-1])
        s, t = block_mean(s.double(), size), block_mean(t.double(), size)
        q_s, q_t = (x.abs().pow(p).sum(dim=1).flatten(1) for x in (s, t))
        q_s, q_t = q_s / q_s.norm(dim=1, keepdim=True), q_t / q_t.norm(dim=1, keepdim=True)
        total = total + ((q_s - q_t) ** 2).mean()
    return total


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_loss_and_gradient_match_float64_formula(p: float) -> None:
    """Signed inputs: with p = 3 the paper's |A|^p differs from A^p, so the absolute value is checked too."""
    method = standalone_method(AT, AT.Options(weight=7.0, p=p), feature_setup(AT_STUDENT, AT_TEACHER))
    student, teacher = random_maps(AT_STUDENT, 0), random_maps(AT_TEACHER, 10)
    leaves = [x.double().requires_grad_() for x in student]
    for x in student:
        x.requires_grad_()
    got = method.loss_terms(feature_step(student, teacher))
    assert list(got) == ["loss_at"] and got["loss_at"].dtype == torch.float32
    expected = 7.0 * _at_reference(leaves, teacher, p)
    assert got["loss_at"].item() == pytest.approx(expected.item(), rel=1e-5)
    got["loss_at"].backward()
    expected.backward()
    for i in (1, 2, 3):  # each paired stage output receives the gradient of its pair
        torch.testing.assert_close(student[i].grad.double(), leaves[i].grad, rtol=1e-4, atol=1e-9)
    assert student[0].grad is None and student[4].grad is None  # the stem and the pooled vector take no part


def test_at_is_zero_for_equal_maps_and_ignores_their_scale() -> None:
    maps = random_maps(AT_STUDENT, 0)[1:-1]
    assert at_loss(maps, maps, 2.0).item() == 0.0
    assert at_loss([5.0 * m for m in maps], maps, 2.0).item() == pytest.approx(0.0, abs=1e-12)
    assert at_loss([m.flip(-1) for m in maps], maps, 2.0).item() > 1e-3  # control: a moved attention does count


def test_at_needs_spatial_stage_outputs() -> None:
    with pytest.raises(ConfigError, match="method at"):
        standalone_method(AT, AT.Options(), feature_setup([(3, 8, 8), (6,)], [(3, 8, 8), (4, 8, 8), (6,)]))


# ------------------------------------------------------------------------------------------------ real networks
def _real_distiller(options: object, student_name: str = "resnet8", teacher_name: str = "resnet14",
                    batch: int = 4) -> tuple[Distiller, Batch]:
    """teacher → student with 10 classes, a learned global τ, the default γ·CE + α·KD beside the method's term."""
    return zoo_distiller(options, student_name, teacher_name, batch=batch)


def _one_step_moves_student_and_heads(distiller: Distiller, batch: Batch, term: str) -> None:
    """One SGD step: finite terms, every trainable parameter but τ moves, the teacher gets no gradient, τ does."""
    method = distiller.unwrapped
    out = distiller(batch, STEP)
    assert set(out.losses) == {"loss_ce", "loss_kd", term}
    assert all(torch.isfinite(v) for v in out.losses.values()) and out.losses[term].item() > 0
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    sum(out.losses.values()).backward()
    tau = method.temperature.parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in tau)
    torch.optim.SGD(method.parameters(), lr=0.1).step()
    moved = {name for name, p in method.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert "student.conv1.weight" in moved
    heads = {name for name in before if not name.startswith(("student.", "temperature."))}
    assert heads <= moved, heads - moved
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_fitnet_in_a_real_distiller_trains_the_regressor_and_the_student() -> None:
    distiller, batch = _real_distiller(FitNet.Options())
    regressor = distiller.unwrapped.regressor
    assert isinstance(regressor[0], nn.Conv2d) and tuple(regressor[0].weight.shape) == (32, 32, 1, 1)  # 16×16 both
    _one_step_moves_student_and_heads(distiller, batch, "loss_fitnet")


def test_at_in_a_real_distiller_trains_the_student() -> None:
    distiller, batch = _real_distiller(AT.Options())
    assert {k for k in distiller.unwrapped.state_dict() if not k.startswith(("student.", "temperature."))} == set()
    _one_step_moves_student_and_heads(distiller, batch, "loss_at")


@pytest.mark.slow
def test_torchvision_student_at_works_fitnet_needs_fitting_maps() -> None:
    """torchvision.resnet18 on 32×32 has 8/4/2/1-pixel stages against resnet14's 32/16/8: AT pools the teacher's,
    FitNet's regressor cannot map a 4×4 hint onto 16×16 (a clear error); with a torchvision teacher it can."""
    distiller, batch = _real_distiller(AT.Options(), student_name="torchvision.resnet18")
    _one_step_moves_student_and_heads(distiller, batch, "loss_at")
    with pytest.raises(ConfigError, match=r"method fitnet.*4×4.*16×16"):
        _real_distiller(FitNet.Options(), student_name="torchvision.resnet18")
    distiller, batch = _real_distiller(FitNet.Options(), "torchvision.resnet18", "torchvision.resnet18")
    _one_step_moves_student_and_heads(distiller, batch, "loss_fitnet")


# ------------------------------------------------------------------------------------------------ end to end
SMALL = {"num_classes": 10, "train_size": 96, "test_size": 32, "seed": 0}  # 3 steps of 32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fitnet", "at"])
def test_one_epoch_ctkd_run_logs_a_finite_method_loss(tmp_path: Path, teacher_file: Path, name: str) -> None:
    record = one_epoch_record(tmp_path, teacher_file, {"name": name}, data=SMALL, logging={"tensorboard": False})
    assert record[f"train_loss_{name}"] > 0 and math.isfinite(record[f"train_loss_{name}"])
    assert math.isfinite(record["train_loss_kd"]) and math.isfinite(record["tau_mean"])
