"""CRD (Tian et al., ICLR 2020): NCE loss against float64, Z estimated once, exact negatives, bank update, gradients,
checkpointed state with a bit-identical resume, and 2 processes = 1 process."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from resume_tools import free_port, spawned_run
from torch import Tensor, nn

import tiny_models  # noqa: F401  (registers tiny_mlp, a BatchNorm-free model)
from conftest import ctkd_config, load
from ctkd.config import LossConfig
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller
from ctkd.evaluation import evaluate
from ctkd.methods import MethodSetup, StepContext, crd
from ctkd.methods.crd import CRD, CRDState, contrast_scores, dense_products, gathered_products, nce_loss
from ctkd.models import FeatureClassifier
from ctkd.temperatures import FixedTemperature
from ctkd.trainer import run

N, B, K, DIM = 20, 4, 5, 8  # the small fixed example: bank rows, batch, negatives, embedding dimension
EPS = 1e-7  # the authors' ε in both NCE log terms
STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)


class FeatureNet(FeatureClassifier):
    """Flatten → Linear → ReLU → Linear on 3×2×2 inputs; its pooled vector is `width` wide (no BatchNorm)."""

    supports_preact = False

    def __init__(self, width: int, classes: int = 4) -> None:
        super().__init__()
        self.hidden, self.fc = nn.Linear(12, width), nn.Linear(width, classes)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        pooled = self.hidden(x.flatten(1)).relu()
        return [pooled], self.fc(pooled)

    def get_classifier(self) -> nn.Linear:
        return self.fc


def _targets(n: int = N, classes: int = 4) -> Tensor:
    return torch.arange(n) % classes


def _distiller(targets: Tensor | None = None, seed: int = 0, **options: object) -> Distiller:
    """CRD around a width-6 student and a width-10 teacher (different widths: the two heads cannot be swapped)."""
    torch.manual_seed(seed)
    targets = _targets() if targets is None else targets
    student, teacher = FeatureNet(6), FeatureNet(10)
    setup = MethodSetup([(6,)], [(10,)], 4, targets, seed=seed)
    opts = CRD.Options(**{"nce_k": K, "feat_dim": DIM, **options})
    return build_distiller(opts, student=student, teacher=teacher, temperature=FixedTemperature(4.0),
                           loss=LossConfig(), setup=setup)


def _batch(indices: list[int], targets: Tensor | None = None) -> Batch:
    idx = torch.tensor(indices)
    targets = _targets() if targets is None else targets
    images = torch.randn(len(indices), 3, 2, 2, generator=torch.Generator().manual_seed(sum(indices)))
    return Batch(images, targets[idx], idx, len(indices))


def _embeddings(distiller: Distiller, batch: Batch) -> tuple[Tensor, Tensor]:
    """Student and teacher embeddings in float64, from the heads' weights: normalize(W·f + b)."""
    method = distiller.unwrapped
    with torch.no_grad():
        f_s = method.student.forward_with_features(batch.images)[0][-1].double()
        f_t = distiller.teacher.forward_with_features(batch.images)[0][-1].double()

    def embed(head: nn.Linear, f: Tensor) -> Tensor:
        x = f @ head.weight.detach().double().T + head.bias.detach().double()
        return x / x.norm(dim=1, keepdim=True)

    return embed(method.embed_s, f_s), embed(method.embed_t, f_t)


def _reference_side(v: Tensor, bank: Tensor, contrast: Tensor, nce_t: float, n: int) -> tuple[Tensor, Tensor]:
    """One side's NCE loss and Z in float64, written out from the paper's critic and the authors' memory."""
    scores = torch.exp(torch.einsum("bkd,bd->bk", bank.double()[contrast], v) / nce_t)
    z = scores.mean() * n  # estimated on the first batch
    p = scores / z
    k = contrast.shape[1] - 1
    pn = 1.0 / n
    loss = 0.0
    for i in range(p.shape[0]):
        loss += math.log(p[i, 0] / (p[i, 0] + k * pn + EPS))
        for j in range(1, k + 1):
            loss += math.log(k * pn / (p[i, j] + k * pn + EPS))
    return torch.tensor(-loss / p.shape[0], dtype=torch.float64), z


def _state(distiller: Distiller) -> CRDState:
    assert isinstance(distiller.state, CRDState)
    return distiller.state


# ------------------------------------------------------------------------------------------------ 1. loss value
def test_nce_loss_matches_an_independent_float64_computation() -> None:
    """B=4, K=5, N=20, D=8, first batch. Constants: Pn = 1/N (uniform noise over the N training samples), m = K,
    ε = 1e-7, Z = mean(score)·N estimated on the first batch, scores exp(⟨v, m⟩/0.07) of the teacher embedding against
    the student bank and of the student embedding against the teacher bank (Tian et al. 2020's NCE critic
    h = P/(P + K/N) and the authors' memory); loss = β·(student side + teacher side), β = 0.8."""
    distiller = _distiller()
    state, method = _state(distiller), distiller.unwrapped
    batch = _batch([3, 7, 12, 18])
    v_s, v_t = _embeddings(distiller, batch)
    contrast = state.contrast_indices(batch.indices, K, method.negatives_seed(STEP))
    assert contrast.shape == (B, K + 1) and torch.equal(contrast[:, 0], batch.indices)
    mem_s, mem_t = state.memory_s.clone(), state.memory_t.clone()

    out = distiller(batch, STEP)

    loss_s, z_s = _reference_side(v_s, mem_t, contrast, 0.07, N)
    loss_t, z_t = _reference_side(v_t, mem_s, contrast, 0.07, N)
    torch.testing.assert_close(out.losses["loss_crd"].double(), 0.8 * (loss_s + loss_t), rtol=1e-5, atol=0)
    torch.testing.assert_close(state.z_s.double(), z_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(state.z_t.double(), z_t, rtol=1e-5, atol=0)
    assert set(out.losses) == {"loss_ce", "loss_kd", "loss_crd"}


def test_nce_loss_closed_form_when_every_score_equals_the_noise_level() -> None:
    """P = Pn for all entries: h = 1/(K+1), so the loss per sample is −log(1/(K+1)) − K·log(K/(K+1)) (ε aside)."""
    probs = torch.full((B, K + 1), 1.0 / N, dtype=torch.float64)
    expected = -(math.log(1 / (K + 1)) + K * math.log(K / (K + 1)))
    assert nce_loss(probs, N).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ 2. Z
def test_z_is_estimated_on_the_first_step_only_and_restored_from_a_checkpoint() -> None:
    distiller = _distiller()
    state = _state(distiller)
    assert state.z_s.item() < 0 and state.z_t.item() < 0  # unset before training
    distiller(_batch([0, 1, 2, 3]), STEP)
    z = state.z_s.clone(), state.z_t.clone()
    assert z[0].item() > 0 and z[1].item() > 0
    for value in (state.z_s, state.z_t):
        assert value.grad_fn is None and not value.requires_grad
    distiller(_batch([4, 5, 6, 7]), StepContext(epoch=1, step=1, grl_lambda=1.0))
    assert torch.equal(state.z_s, z[0]) and torch.equal(state.z_t, z[1])  # fixed after the first step

    # A state restored from a checkpoint keeps its Z; a fresh one would estimate another from this batch.
    saved = state.state_dict()
    assert set(saved) == {"memory_s", "memory_t", "z_s", "z_t"}
    resumed, fresh = _distiller(), _distiller()
    _state(resumed).load_state_dict(saved, strict=True)
    later = _batch([8, 9, 10, 11])
    resumed(later, StepContext(epoch=2, step=0, grl_lambda=1.0))
    fresh(later, StepContext(epoch=2, step=0, grl_lambda=1.0))
    assert torch.equal(_state(resumed).z_s, z[0]) and torch.equal(_state(resumed).z_t, z[1])
    assert not torch.equal(_state(fresh).z_s, z[0])  # the control: not restoring it re-estimates it


# ------------------------------------------------------------------------------------------------ 3. sampling
def test_exact_negatives_are_uniform_over_other_classes_and_a_function_of_seed_epoch_step() -> None:
    gen = torch.Generator().manual_seed(5)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate((10, 20, 30))])[torch.randperm(60, generator=gen)]
    state = CRDState(targets, feat_dim=4, seed=0)
    anchors = torch.stack([torch.nonzero(targets == c)[0, 0] for c in range(3)])  # one sample of each class
    draws = 30000
    rng = torch.get_rng_state()
    contrast = state.contrast_indices(anchors, draws, seed=123)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither used nor advanced
    assert torch.equal(contrast[:, 0], anchors)
    negatives = contrast[:, 1:]
    for row, anchor in zip(negatives, anchors):
        assert not (targets[row] == targets[anchor]).any()  # never the anchor's class
        others = torch.nonzero(targets != targets[anchor]).flatten()
        counts = torch.bincount(row, minlength=60)[others].double()
        expected = draws / others.numel()
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        dof = others.numel() - 1
        assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2  # ~6 standard deviations of a χ² with `dof` degrees

    method = _distiller().unwrapped

    def negatives_at(epoch: int, step: int) -> Tensor:
        seed = method.negatives_seed(StepContext(epoch=epoch, step=step, grl_lambda=0.0))
        return state.contrast_indices(anchors, 64, seed)

    assert torch.equal(negatives_at(3, 2), negatives_at(3, 2))
    assert not torch.equal(negatives_at(3, 2), negatives_at(3, 3))
    assert not torch.equal(negatives_at(3, 2), negatives_at(4, 2))


# ------------------------------------------------------------------------------------------------ 4. bank update
def test_bank_update_touches_the_batch_rows_only_and_evaluation_leaves_it_alone() -> None:
    distiller = _distiller(nce_m=0.3)
    state = _state(distiller)
    batch = _batch([2, 5, 11, 19])
    v_s, v_t = _embeddings(distiller, batch)
    old_s, old_t = state.memory_s.clone(), state.memory_t.clone()
    distiller(batch, STEP)
    idx = batch.indices
    rest = torch.ones(N, dtype=torch.bool)
    rest[idx] = False
    for bank, old, v in ((state.memory_s, old_s, v_s), (state.memory_t, old_t, v_t)):
        mixed = 0.3 * old[idx].double() + 0.7 * v
        torch.testing.assert_close(bank[idx].double(), mixed / mixed.norm(dim=1, keepdim=True), rtol=1e-6, atol=1e-6)
        assert torch.equal(bank[rest], old[rest])

    snapshot = {k: v.clone() for k, v in state.state_dict().items()}
    evaluate(distiller.student, [(batch.images, batch.targets)], torch.device("cpu"))
    distiller.train(False)
    distiller(_batch([0, 1, 4, 6]), StepContext(epoch=1, step=1, grl_lambda=1.0))  # a method call in eval mode
    for key, value in state.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


def test_bank_initialisation_is_uniform_in_the_authors_range_and_deterministic() -> None:
    a, b, other = CRDState(_targets(), 48, seed=1), CRDState(_targets(), 48, seed=1), CRDState(_targets(), 48, seed=2)
    bound = 1 / math.sqrt(48 / 3)
    for bank in (a.memory_s, a.memory_t):
        assert bank.shape == (N, 48) and bank.abs().max().item() <= bound
        assert bank.abs().max().item() > 0.9 * bound
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)
    assert not torch.equal(a.memory_s, a.memory_t) and not torch.equal(a.memory_s, other.memory_s)
    with pytest.raises(ValueError, match="two classes"):
        CRDState(torch.zeros(5, dtype=torch.long), 8, seed=0)


# ------------------------------------------------------------------------------------------------ 5. gradients
def test_gradients_reach_the_student_and_both_heads_never_the_teacher() -> None:
    distiller = _distiller()
    distiller(_batch([0, 5, 10, 15]), STEP).losses["loss_crd"].backward()
    method = distiller.unwrapped
    # the student's layers up to its pooled vector (its classifier is not on CRD's path) and both heads
    for name, module in (("student", method.student.hidden), ("embed_s", method.embed_s), ("embed_t", method.embed_t)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not _state(distiller).memory_s.requires_grad


def _bank_and_embeddings(n: int, b: int, k: int, d: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """A normalised (n, d) bank, (b, d) embeddings that take gradients and (b, 1+k) contrast rows."""
    gen = torch.Generator().manual_seed(n + k)
    bank = nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    v = nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1).requires_grad_()
    return bank, v, torch.randint(0, n, (b, 1 + k), generator=gen)


def test_dense_and_gathered_products_agree_in_value_and_gradient_with_float64() -> None:
    bank, v, contrast = _bank_and_embeddings(n=50, b=6, k=9)
    expected = torch.einsum("bkd,bd->bk", bank.double()[contrast], v.detach().double())
    weights = torch.randn(contrast.shape, generator=torch.Generator().manual_seed(1))
    grad = (weights.double().unsqueeze(2) * bank.double()[contrast]).sum(1)  # d(Σ w·⟨v, m⟩)/dv
    for products in (dense_products, gathered_products):
        v.grad = None
        out = products(v, bank, contrast)
        (out * weights).sum().backward()
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6, msg=products.__name__)
        torch.testing.assert_close(v.grad.double(), grad, rtol=1e-5, atol=1e-6, msg=products.__name__)


def test_the_dense_product_keeps_the_pre_update_bank_for_backward() -> None:
    """The bank moves in place between scoring and backward; the gradient must use the rows that were scored."""
    bank, v, contrast = _bank_and_embeddings(n=30, b=4, k=7)
    before = bank[contrast].clone()
    dense_products(v, bank, contrast).sum().backward()
    expected = v.grad.clone()
    v.grad = None
    out = dense_products(v, bank, contrast)
    bank.mul_(-2.0)  # what update_bank does: rows change in place after scoring
    out.sum().backward()
    assert torch.equal(v.grad, expected)
    torch.testing.assert_close(expected, before.sum(1), rtol=1e-5, atol=1e-6)  # d(Σ⟨v, m⟩)/dv = Σ m


@pytest.mark.parametrize(("n", "dense"), [(8 * 6, True), (8 * 6 + 1, False)])
def test_contrast_scores_take_the_dense_product_for_a_bank_of_up_to_8_rows_per_column(
        n: int, dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """1+K = 6 columns: the whole-bank product is used up to 48 rows, the row gather beyond (ImageNet's bank)."""
    calls: list[str] = []
    for name in ("dense_products", "gathered_products"):
        original = getattr(crd, name)
        monkeypatch.setattr(crd, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    bank, v, contrast = _bank_and_embeddings(n=n, b=3, k=5)
    scores = contrast_scores(v, bank, contrast, 0.07)
    assert calls == ["dense_products" if dense else "gathered_products"]
    expected = torch.exp(torch.einsum("bkd,bd->bk", bank.double()[contrast], v.detach().double()) / 0.07)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------ 6. end to end
SMALL = {"num_classes": 10, "train_size": 96, "test_size": 32, "seed": 0}  # 3 steps of 32 per epoch


def _crd_config(tmp_path: Path, teacher_file: Path, name: str, epochs: int, **sections: object) -> dict:
    """The tiny CTKD run (resnet14 → resnet8) with CRD, smaller data and no TensorBoard to keep the test short."""
    sections = {"data": SMALL, "logging": {"tensorboard": False}, **sections}
    data = ctkd_config(tmp_path, teacher_file, name, epochs=epochs, **sections)
    data["method"] = {"name": "crd", "nce_k": 16, "feat_dim": 16}  # set here: ctkd_config merges only dict sections
    return data


def _saved(output_dir: Path) -> dict:
    return torch.load(output_dir / "last.pth", weights_only=True)


# ------------------------------------------------------------------------------------------------ 7. DDP
@pytest.mark.slow
def test_two_processes_train_the_same_heads_and_banks_as_one(tmp_path: Path, teacher_file: Path) -> None:
    """BN-free student, 99 samples (the last global batch of 3 splits 2 + 1): every rank scores the whole global
    batch and applies the same bank update, so weights, heads, banks and Z equal the single-process run."""
    uneven = {"num_classes": 10, "train_size": 99, "test_size": 32, "seed": 0}
    sections = {"student": {"name": "tiny_mlp"}, "data": uneven, "distributed": {"timeout_s": 30.0}}
    two = load(_crd_config(tmp_path, teacher_file, "two", 1, **sections), tmp_path, "two.yaml")
    mp.spawn(spawned_run, args=(2, free_port(), str(tmp_path / "two.yaml")), nprocs=2, join=True)
    run(load(_crd_config(tmp_path, teacher_file, "one", 1, **sections), tmp_path, "one.yaml"))
    a, b = _saved(Path(two.output_dir)), _saved(tmp_path / "one")
    assert a["world_size"] == 2 and b["world_size"] == 1
    for part in ("trainable", "method_state"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
    init = CRDState(torch.arange(99) % 10, 16, seed=0).memory_s
    assert not torch.allclose(a["method_state"]["memory_s"], init)  # the banks did move
