"""NST and KDSVD: losses and gradients against independent float64 formulas, the SVD's guarded gradient, shape
checks, real networks, end-to-end runs.

NST (Huang & Wang 2017): per stage, MMD² between the student's and the teacher's L2-normalised channel maps with the
polynomial kernel k(x, y) = (xᵀy)²; through its feature map φ(x) = x xᵀ that is ‖mean_i s_i s_iᵀ − mean_j t_j t_jᵀ‖²_F
per sample (the form the reference below uses), averaged over the batch and summed over the stages.
KDSVD (Lee et al., ECCV 2018; mdistiller's KDSVD): see `_kdsvd_reference`, written from mdistiller's kdsvd_loss (its
constants: k + 3 student candidates, the RBF's /8, the sum divided by the batch size) on either matrix: the paper's
and RepDistiller's (H·W, C), or mdistiller's (C·H, W).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import feature_setup, feature_step, one_epoch_record, standalone_method, zoo_distiller
from ctkd.config import ConfigError, method_class
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller
from ctkd.methods import StepContext
from ctkd.methods.kdsvd import KDSVD, TopRightSingularVectors, kdsvd_loss
from ctkd.methods.nst import NST, nst_loss

pytestmark = pytest.mark.usefixtures("single_thread")

STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
TAU = torch.tensor(4.0)


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _maps(shapes: list[tuple[int, ...]], seed: int, batch: int = 3) -> list[Tensor]:
    return [_randn(seed + i, batch, *shape) for i, shape in enumerate(shapes)]


def _block_mean(x: Tensor, size: int) -> Tensor:
    """Average of non-overlapping blocks down to size×size (written out, not adaptive_avg_pool2d)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


# ------------------------------------------------------------------------------------------------ NST
# Pair 1 equal sizes, pair 2 a larger teacher map (8×8 → 4×4), pair 3 a larger student map (4×4 → 2×2); the
# teacher's extra stage is dropped by the zip.
NST_STUDENT = [(3, 8, 8), (4, 8, 8), (5, 4, 4), (6, 4, 4), (6,)]
NST_TEACHER = [(3, 8, 8), (7, 8, 8), (8, 8, 8), (9, 2, 2), (2, 2, 2), (9,)]


def _nst_reference(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Σ_pairs batch mean of ‖mean_i ŝ_i ŝ_iᵀ − mean_j t̂_j t̂_jᵀ‖²_F in float64, x̂ a channel's map as a unit vector."""
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(student[1:-1], teacher[1:-1]):
        size = min(s.shape[-1], t.shape[-1])
        s, t = (_block_mean(x.double(), size).flatten(2) for x in (s, t))
        s, t = s / s.norm(dim=2, keepdim=True), t / t.norm(dim=2, keepdim=True)
        phi_s = torch.einsum("bcn,bcm->bnm", s, s) / s.shape[1]  # mean over channels of the outer products
        phi_t = torch.einsum("bcn,bcm->bnm", t, t) / t.shape[1]
        total = total + (phi_s - phi_t).pow(2).sum(dim=(1, 2)).mean()
    return total


def test_nst_loss_and_gradient_match_the_kernel_mean_embedding() -> None:
    method = standalone_method(NST, NST.Options(weight=3.0), feature_setup(NST_STUDENT, NST_TEACHER))
    student, teacher = _maps(NST_STUDENT, 0), _maps(NST_TEACHER, 10)
    leaves = [x.double().requires_grad_() for x in student]
    for x in student:
        x.requires_grad_()
    got = method.loss_terms(feature_step(student, teacher))
    assert list(got) == ["loss_nst"] and got["loss_nst"].dtype == torch.float32
    expected = 3.0 * _nst_reference(leaves, teacher)
    assert got["loss_nst"].item() == pytest.approx(expected.item(), rel=1e-5)
    got["loss_nst"].backward()
    expected.backward()
    for i in (1, 2, 3):
        torch.testing.assert_close(student[i].grad.double(), leaves[i].grad, rtol=1e-4, atol=1e-8)
    assert student[0].grad is None and student[4].grad is None


def test_nst_is_zero_for_equal_maps_and_positive_otherwise() -> None:
    maps = _maps(NST_STUDENT, 0)[1:-1]
    assert nst_loss(maps, maps).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss([3.0 * m for m in maps], maps).item() == pytest.approx(0.0, abs=1e-6)  # maps are normalised
    others = _maps(NST_STUDENT, 20)[1:-1]
    assert nst_loss(others, maps).item() > 1e-3


def test_nst_needs_spatial_stage_outputs() -> None:
    with pytest.raises(ConfigError, match="method nst"):
        standalone_method(NST, NST.Options(), feature_setup([(3, 8, 8), (6,)], [(3, 8, 8), (4, 8, 8), (6,)]))


# ------------------------------------------------------------------------------------------------ KDSVD
def _matrix(x: Tensor, vectors: str) -> Tensor:
    """mdistiller's view(B, C·H, W) of an NCHW map, or the authors' NHWC reshape to (B, H·W, C)."""
    b, c, h, w = x.shape
    return x.reshape(b, c * h, w) if vectors == "width" else x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _signed(v: Tensor) -> Tensor:
    """Columns with a non-negative sum (the teacher's sign convention; LAPACK's own is arbitrary)."""
    return v * torch.where(v.detach().sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(v.dtype)


def _kdsvd_reference(student: list[Tensor], teacher: list[Tensor], k: int, vectors: str) -> Tensor:
    """mdistiller's kdsvd_loss in float64 with torch.linalg.svd's own backward: teacher's k and student's k + 3
    right singular vectors, the student's aligned by a ±1 mask at each column's max |cosine| (align_rsv), both times
    the teacher's normalised singular values; between consecutive stages exp(−Δ²/8), Σ(S − T)² / B."""
    total, prev = torch.zeros((), dtype=torch.float64), None
    for s_map, t_map in zip(student, teacher):
        _, s_t, vh_t = torch.linalg.svd(_matrix(t_map.double(), vectors), full_matrices=False)
        _, _, vh_s = torch.linalg.svd(_matrix(s_map.double(), vectors), full_matrices=False)
        v_t, v_s = _signed(vh_t.mT[..., :k]), vh_s.mT[..., : k + 3]
        cosine = v_s.mT @ v_t
        peak = cosine.abs().amax(dim=1, keepdim=True)
        mask = torch.where(cosine.abs() == peak, torch.sign(cosine), torch.zeros_like(cosine)).detach()
        weight = (s_t[:, :k] / s_t[:, :k].norm(dim=1, keepdim=True)).unsqueeze(1)
        cur = (v_s @ mask * weight, v_t * weight)
        if prev is not None:
            rbf_s = torch.exp(-(cur[0].unsqueeze(2) - prev[0].unsqueeze(1)) ** 2 / 8)
            rbf_t = torch.exp(-(cur[1].unsqueeze(2) - prev[1].unsqueeze(1)) ** 2 / 8)
            total = total + ((rbf_s - rbf_t.detach()) ** 2).sum()
        prev = cur
    return total / student[0].shape[0]


# width: equal widths per stage, channels differ; channels: equal channels, and a last student stage of 2×2
# (H·W = 4 < C = 10: a wide matrix, the full-V path of the decomposition)
KDSVD_SHAPES = {
    "width": ([(4, 16, 16), (6, 8, 8), (8, 4, 4)], [(5, 16, 16), (7, 8, 8), (9, 4, 4)]),
    "channels": ([(6, 8, 8), (8, 4, 4), (10, 2, 2)], [(6, 8, 8), (8, 8, 8), (10, 4, 4)]),
}


@pytest.mark.parametrize("vectors", ["width", "channels"])
@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_loss_and_gradient_match_mdistillers_algorithm(vectors: str, k: int) -> None:
    s_shapes, t_shapes = KDSVD_SHAPES[vectors]
    options = KDSVD.Options(weight=2.0, k=k, vectors=vectors)
    setup = feature_setup([(3, 4, 4), *s_shapes, (8,)], [(3, 4, 4), *t_shapes, (9,)])
    method = standalone_method(KDSVD, options, setup)
    student = [_randn(10 + i, 4, *shape) for i, shape in enumerate(s_shapes)]
    teacher = [_randn(20 + i, 4, *shape) for i, shape in enumerate(t_shapes)]
    leaves = [x.double().requires_grad_() for x in student]
    for x in student:
        x.requires_grad_()
    stem, pooled = torch.zeros(4, 3, 4, 4), torch.zeros(4, 8)
    got = method.loss_terms(feature_step([stem, *student, pooled], [stem, *teacher, pooled]))
    assert list(got) == ["loss_kdsvd"] and got["loss_kdsvd"].dtype == torch.float32
    expected = 2.0 * _kdsvd_reference(leaves, teacher, k, vectors)
    assert expected.item() > 1e-4  # a value that is not trivially zero
    assert got["loss_kdsvd"].item() == pytest.approx(expected.item(), rel=1e-5)
    got["loss_kdsvd"].backward()
    expected.backward()
    for ours, theirs in zip(student, leaves):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-7)


def _dead_relu_maps(seed: int, vectors: str) -> list[Tensor]:
    """ReLU maps whose matrices have two zero columns (dead width positions, or dead channels: repeated zero singular
    values) in every sample, and one all-zero sample."""
    maps = [_randn(seed + i, 3, c, h, h, dtype=torch.float64).relu() for i, (c, h) in enumerate([(4, 8), (5, 4)])]
    for m in maps:
        if vectors == "width":
            m[:, :, :, -2:] = 0.0
        else:
            m[:, -2:] = 0.0
        m[2] = 0.0
    return maps


@pytest.mark.parametrize("vectors", ["channels", "width"])
def test_kdsvd_gradient_is_finite_where_the_plain_svd_gradient_is_nan(vectors: str) -> None:
    """Two dead columns: torch.linalg.svd's backward divides 0 by 0; the guarded one gives the true derivative (the
    leading vectors are well defined: a finite-difference check), and zero for an all-zero sample."""
    student, teacher = _dead_relu_maps(0, vectors), _dead_relu_maps(10, vectors)
    plain = [m.clone().requires_grad_() for m in student]
    _kdsvd_reference(plain, teacher, 1, vectors).backward()
    assert not all(torch.isfinite(m.grad).all() for m in plain)  # what the guard is for
    leaves = [m.clone().requires_grad_() for m in student]
    kdsvd_loss(leaves, teacher, 1, vectors).backward()
    assert all(torch.isfinite(m.grad).all() for m in leaves)
    assert all(m.grad[2].abs().max() == 0 for m in leaves)  # the all-zero sample: no direction is preferred
    live = tuple(m.detach()[:2].clone().requires_grad_() for m in student)  # the samples with live columns
    live_teacher = [m[:2] for m in teacher]
    check = torch.autograd.gradcheck
    assert check(lambda *maps: kdsvd_loss(list(maps), live_teacher, 1, vectors), live, fast_mode=True)


def test_kdsvd_is_zero_for_equal_maps_and_finite_on_random_and_non_finite_ones() -> None:
    maps = [_randn(i, 2, c, h, h).relu() for i, (c, h) in enumerate([(4, 16), (6, 8), (8, 4)])]
    same = [m.clone().requires_grad_() for m in maps]
    loss = kdsvd_loss(same, maps)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert all(m.grad.abs().max() < 1e-9 for m in same)  # a minimum: no pull away from the teacher
    for seed in range(5):  # random maps, signed and ReLU'd: finite values and gradients
        student = [_randn(100 * seed + i, 2, *m.shape[1:]).requires_grad_() for i, m in enumerate(maps)]
        loss = kdsvd_loss([s if seed % 2 else s.relu() for s in student], maps)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(s.grad).all() for s in student)
    broken = [m.clone() for m in maps]
    broken[1][0, 0, 0, 0] = float("nan")  # decomposed as zeros (torch.linalg.svd would raise)
    assert torch.isfinite(kdsvd_loss(broken, maps))


def test_top_singular_vectors_agree_with_torch_and_pass_gradcheck() -> None:
    """Tall, wide and rank-deficient matrices; the sign convention makes every vector's entries sum to ≥ 0."""
    deficient = _randn(3, 2, 9, 6, dtype=torch.float64)
    deficient[:, :, 3:] = 0.0  # three dead columns
    for x in (_randn(1, 2, 9, 5, dtype=torch.float64), _randn(2, 2, 4, 7, dtype=torch.float64), deficient):
        v, s = TopRightSingularVectors.apply(x, 3)
        _, s_ref, vh = torch.linalg.svd(x, full_matrices=False)
        torch.testing.assert_close(s, s_ref[:, :3])
        torch.testing.assert_close(v, _signed(vh.mT[..., :3]))
        assert (v.sum(dim=1) >= 0).all()
        leaf = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a: TopRightSingularVectors.apply(a, 3)[0], (leaf,))
    v, s = TopRightSingularVectors.apply(_randn(4, 1, 2, 6, dtype=torch.float64), 4)
    assert v.shape == (1, 6, 2) and s.shape == (1, 2)  # no more vectors than singular values


def test_top_singular_vectors_drop_the_coupling_of_equal_singular_values() -> None:
    """σ₁ = σ₂ up to rounding (a rotated diag(3, 3, 1, 0.5)): 1/(σ₁² − σ₂²) would be ~1e15; the pair is left out."""
    q = torch.linalg.qr(_randn(5, 8, 8, dtype=torch.float64))[0][:, :4]
    u = torch.linalg.qr(_randn(6, 4, 4, dtype=torch.float64))[0]
    x = (q @ torch.diag(torch.tensor([3.0, 3.0, 1.0, 0.5], dtype=torch.float64)) @ u.T)[None].requires_grad_()
    v, _ = TopRightSingularVectors.apply(x, 2)
    (v * _randn(7, 1, 4, 2, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 10.0


def test_kdsvd_option_defaults_and_shape_checks() -> None:
    assert (KDSVD.Options().weight, KDSVD.Options().k) == (1.0, 1)  # mdistiller's KDSVD config
    assert KDSVD.Options().vectors == "channels"  # the paper's, the authors' and RepDistiller's matrices
    assert NST.Options().weight == 50.0 and method_class("nst") is NST and method_class("kdsvd") is KDSVD  # -b 50
    with pytest.raises(ConfigError, match="vectors"):
        KDSVD.Options(vectors="rows")
    student = [(3, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]  # resnet8
    wider = [(3, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]  # wrn_16_2
    standalone_method(KDSVD, KDSVD.Options(vectors="width"), feature_setup(student, wider))  # equal widths
    with pytest.raises(ConfigError, match=r"method kdsvd \(method.vectors = channels\).*channel counts"):
        standalone_method(KDSVD, KDSVD.Options(), feature_setup(student, wider))
    with pytest.raises(ConfigError, match="two or more paired stage outputs"):
        one_stage = [(3, 8, 8), (4, 8, 8), (4,)]
        standalone_method(KDSVD, KDSVD.Options(), feature_setup(one_stage, one_stage))


# ------------------------------------------------------------------------------------------------ real networks
def _real_distiller(options: object, student_name: str = "resnet8", teacher_name: str = "resnet14",
                    batch: int = 4) -> tuple[Distiller, Batch]:
    """teacher → student with 10 classes, a learned global τ, the default γ·CE + α·KD beside the method's term."""
    return zoo_distiller(options, student_name, teacher_name, batch=batch)


def _one_step_moves_the_student(distiller: Distiller, batch: Batch, term: str) -> None:
    """One SGD step: finite terms, the student moves, τ gets a gradient (CTKD applies), the teacher none."""
    method = distiller.unwrapped
    out = distiller(batch, STEP)
    assert set(out.losses) == {"loss_ce", "loss_kd", term}
    assert all(torch.isfinite(v) for v in out.losses.values()) and out.losses[term].item() > 0
    assert {k for k in method.state_dict() if not k.startswith(("student.", "temperature."))} == set()  # no heads
    before = method.student.conv1.weight.detach().clone()
    sum(out.losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in method.student.parameters() if p.grad is not None)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.temperature.parameters())
    torch.optim.SGD(method.parameters(), lr=0.1).step()
    assert not torch.equal(method.student.conv1.weight.detach(), before)
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.parametrize("options,term", [(NST.Options(), "loss_nst"), (KDSVD.Options(), "loss_kdsvd"),
                                          (KDSVD.Options(vectors="width"), "loss_kdsvd")])
def test_one_real_step_is_finite_and_moves_the_student(options: object, term: str) -> None:
    distiller, batch = _real_distiller(options)
    _one_step_moves_the_student(distiller, batch, term)


@pytest.mark.slow
def test_torchvision_student_nst_works_kdsvd_needs_equal_vector_lengths() -> None:
    """torchvision.resnet18 on 32×32 has 64/128/256/512 channels and 8/4/2/1-pixel stages against resnet14's 16/32/64
    and 32/16/8: NST pools the teacher's maps; KDSVD's vectors cannot be compared either way, a clear error."""
    distiller, batch = _real_distiller(NST.Options(), student_name="torchvision.resnet18")
    _one_step_moves_the_student(distiller, batch, "loss_nst")
    with pytest.raises(ConfigError, match=r"method kdsvd.*channel counts"):
        _real_distiller(KDSVD.Options(), student_name="torchvision.resnet18")
    with pytest.raises(ConfigError, match=r"method kdsvd.*widths"):
        _real_distiller(KDSVD.Options(vectors="width"), student_name="torchvision.resnet18")


# ------------------------------------------------------------------------------------------------ end to end
SMALL = {"num_classes": 10, "train_size": 96, "test_size": 32, "seed": 0}  # 3 steps of 32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nst", "kdsvd"])
def test_one_epoch_ctkd_run_logs_a_finite_method_loss(tmp_path: Path, teacher_file: Path, name: str) -> None:
    record = one_epoch_record(tmp_path, teacher_file, {"name": name}, data=SMALL, logging={"tensorboard": False})
    assert record[f"train_loss_{name}"] > 0 and math.isfinite(record[f"train_loss_{name}"])
    assert math.isfinite(record["train_loss_kd"]) and math.isfinite(record["tau_mean"])
