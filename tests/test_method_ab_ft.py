"""AB and FT: losses and gradients against independent float64 formulas, stages, heads, errors and end-to-end runs.

AB (Heo et al., AAAI 2019) as RepDistiller's ABLoss: per stage pair i of n, the alternative L2 loss
Σ (s + μ)²·[s > −μ, t ≤ 0] + (s − μ)²·[s ≤ μ, t > 0] of the connected pre-ReLU student map s against the teacher's t,
weighted 2^(i − n + 1), divided by the batch size and multiplied by 3/1000 (constants: RepDistiller distiller_zoo/AB.py,
margin μ = 1 its default; 3/1000 the AB authors' multiplier).
FT (Kim et al., NeurIPS 2018) as RepDistiller's FactorTransfer: mean |φ(T(s)) − φ(E(t))|^p with φ(F) = normalize(
mean_c F²) (RepDistiller p1 = 2) or the paper's normalize(vec F), T the translator (conv + BN + LeakyReLU 0.1, ×3),
E the paraphraser's encoder (conv + LeakyReLU 0.1, ×3); its init stage minimises MSE(decoder(E(t)), t).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from resume_tools import free_port, spawned_run
from torch import Tensor, nn

import ctkd.models as models
from conftest import ctkd_config, load, write_yaml
from ctkd import trainer
from ctkd.config import ConfigError, LossConfig, load_config
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.distributed import DistributedContext
from ctkd.methods import METHODS, MethodSetup, Stage, StepContext, TeacherOutput
from ctkd.methods.ab import AB
from ctkd.methods.base import StepInputs
from ctkd.methods.ft import FT, ft_loss
from ctkd.networks import check_preact_features
from ctkd.optim import build_sgd
from ctkd.stages import ActiveStage
from ctkd.temperatures import FixedTemperature, GlobalTemperature

pytestmark = pytest.mark.usefixtures("single_thread")
STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _method(cls: type, options: object, student: list, teacher: list) -> nn.Module:
    """A method around a stand-in student; its loss terms are called directly with given features."""
    setup = MethodSetup(student, teacher, 10, torch.zeros(0, dtype=torch.long), seed=0)
    return cls(nn.Linear(2, 10), FixedTemperature(4.0), options=options, loss=LossConfig(), setup=setup)


def _step(student: list[Tensor], teacher: list[Tensor], tau: Tensor | None = None) -> StepInputs:
    n = student[0].shape[0]
    batch = Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n), n)
    return StepInputs(batch, None, student, TeacherOutput(None, teacher), torch.tensor(4.0) if tau is None else tau,
                      STEP, None)


def _features(shapes: list[tuple[int, ...]], seed: int, batch: int = 4, grad: bool = False) -> list[Tensor]:
    return [(1.5 * _randn(seed + i, batch, *shape)).requires_grad_(grad) for i, shape in enumerate(shapes)]


def _bn64(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """Training-mode BatchNorm in float64: batch mean and biased variance per channel, then the affine map."""
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = bn.weight.detach().double().view(1, -1, 1, 1), bn.bias.detach().double().view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * w + b


def _conv64(x: Tensor, conv: nn.Module) -> Tensor:
    """A (transposed) convolution of `conv` with its weights in float64."""
    op = F.conv_transpose2d if isinstance(conv, nn.ConvTranspose2d) else F.conv2d
    bias = None if conv.bias is None else conv.bias.detach().double()
    return op(x, conv.weight.detach().double(), bias, conv.stride, conv.padding)


def _assert_grad_close(got: Tensor, expected: Tensor) -> None:
    """float32 gradient against float64 within 1e-5 of the gradient's largest entry."""
    assert expected.abs().max() > 0 and (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def _leaky64(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, 0.1 * x)  # LeakyReLU(0.1) of RepDistiller's Paraphraser/Translator


# ------------------------------------------------------------------------------------------------ AB
# stem, three stage outputs, pooled vector; pair 1 equal (no connector), pair 2 a student map twice as large (strided
# 3×3 conv), pair 3 half as large (transposed 4×4 conv); ConvReg of RepDistiller models/util.py, without its ReLU
AB_STUDENT = [(3, 8, 8), (4, 8, 8), (6, 4, 4), (8, 2, 2), (8,)]
AB_TEACHER = [(3, 8, 8), (4, 8, 8), (5, 2, 2), (9, 4, 4), (9,)]


def _ab_reference(method: AB, student: list[Tensor], teacher: list[Tensor], margin: float) -> Tensor:
    """RepDistiller's ABLoss in float64 on the connected maps: weights 1/4, 1/2, 1; / B; · 3/1000."""
    total = torch.zeros((), dtype=torch.float64)
    for weight, s, t, c in zip((0.25, 0.5, 1.0), student[1:-1], teacher[1:-1], method.connectors):
        s, t = s.double(), t.double()
        if not isinstance(c, nn.Identity):
            s = _bn64(_conv64(s, c[0]), c[1])
        loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0))
        total = total + weight * loss.sum()
    return total / s.shape[0] * 3 / 1000


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_loss_and_its_gradient_match_float64_formula(margin: float) -> None:
    torch.manual_seed(0)
    method = _method(AB, AB.Options(weight=0.7, margin=margin), AB_STUDENT, AB_TEACHER).train()
    assert isinstance(method.connectors[0], nn.Identity)
    assert [type(c[0]) for c in method.connectors[1:]] == [nn.Conv2d, nn.ConvTranspose2d]
    with torch.no_grad():  # a non-trivial BN affine, so the formula's BN is really checked
        for c in method.connectors[1:]:
            c[1].weight.copy_(1 + 0.3 * _randn(30, c[1].weight.shape[0]))
            c[1].bias.copy_(0.2 * _randn(31, c[1].bias.shape[0]))
    student, teacher = _features(AB_STUDENT, 0, grad=True), _features(AB_TEACHER, 10)
    got = method.loss_terms(_step(student, teacher))
    assert list(got) == ["loss_ab"]
    double = [s.detach().double().requires_grad_() for s in student]
    expected = _ab_reference(method, double, teacher, margin)
    assert got["loss_ab"].item() == pytest.approx(0.7 * expected.item(), rel=1e-5)
    got["loss_ab"].backward()
    (0.7 * expected).backward()
    for s, d in zip(student[1:-1], double[1:-1]):
        _assert_grad_close(s.grad, d.grad)
    stage = method.stages()[0]  # the init stage's term is the same loss without β
    init = method.stage_loss_terms(stage, _step(student, teacher))["loss_ab"]
    assert init.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ab_is_zero_beyond_the_margin_on_the_teachers_side_and_independent_of_tau() -> None:
    method = _method(AB, AB.Options(weight=1.0), AB_TEACHER, AB_TEACHER)  # equal shapes: identity connectors
    assert all(isinstance(c, nn.Identity) for c in method.connectors)
    teacher = [t.sign() * (1 + t.abs()) for t in _features(AB_TEACHER, 3)]  # |t| > μ = 1 everywhere
    assert method.loss_terms(_step(teacher, teacher))["loss_ab"].item() == 0.0
    inside = [0.5 * t for t in teacher]  # same signs, inside the margin: penalised
    assert method.loss_terms(_step(inside, teacher))["loss_ab"].item() > 0
    tau = torch.tensor(4.0, requires_grad=True)  # AB's term does not use τ: a learned τ gets nothing from it
    method.loss_terms(_step([s.requires_grad_() for s in inside], teacher, tau))["loss_ab"].backward()
    assert tau.grad is None and AB.uses_tau is False


def test_ab_distillation_weight_defaults_to_repdistillers_zero_and_the_stage_to_its_init() -> None:
    options = AB.Options()
    assert (options.weight, options.margin, options.init_epochs, options.init_lr) == (0.0, 1.0, 30, 0.05)
    method = _method(AB, options, AB_STUDENT, AB_TEACHER)
    assert method.loss_terms(_step(_features(AB_STUDENT, 0), _features(AB_TEACHER, 10))) == {}
    assert not any(p.requires_grad for p in method.connectors.parameters())  # trained in the stage alone
    trained = _method(AB, AB.Options(weight=1.0), AB_STUDENT, AB_TEACHER).connectors
    assert all(p.requires_grad for p in trained.parameters())
    assert method.stages() == [Stage("ab_init", 30, ("student", "connectors"), 0.05, 0.9, 5e-4)]
    assert _method(AB, AB.Options(init_epochs=0), AB_STUDENT, AB_TEACHER).stages() == []
    assert AB.preact and AB.features and METHODS.get("ab") is AB and AB.paper == "Heo et al., AAAI 2019"


def test_ab_refuses_networks_it_cannot_pair() -> None:
    with pytest.raises(ConfigError, match=r"method ab .*Linear.* has 3 .* has 4"):
        _method(AB, AB.Options(), AB_STUDENT, [(3, 8, 8), (4, 8, 8), (5, 2, 2), (9, 4, 4), (9, 4, 4), (9,)])
    with pytest.raises(ConfigError, match=r"cannot connect stage 3 .*\(8, 2, 2\).*\(9, 8, 8\)"):
        _method(AB, AB.Options(), AB_STUDENT, [(3, 8, 8), (4, 8, 8), (5, 2, 2), (9, 8, 8), (9,)])


def _real(name: str, options: object, teacher: str = "resnet14", student: str = "resnet8",
          size: int = 32) -> tuple[Distiller, Batch]:
    """A real distiller (10 classes) and one random batch of 6 images."""
    torch.manual_seed(0)
    s, t = models.build_model(student, num_classes=10), models.build_model(teacher, num_classes=10)
    method = METHODS.get(name)
    setup = measure_setup(s, t, image_shape=(3, size, size), num_classes=10, seed=0, features=True,
                          train_targets=torch.zeros(0, dtype=torch.long), preact=method.preact)
    distiller = build_distiller(options, student=s, teacher=t, temperature=GlobalTemperature(), loss=LossConfig(),
                                setup=setup)
    images = _randn(1, 6, 3, size, size)
    return distiller.train(), Batch(images, torch.arange(6) % 10, torch.arange(6), 6)


def _stage_step(distiller: Distiller, batch: Batch, stage: Stage) -> dict[str, Tensor]:
    """One step of `stage` through the run's stage machinery (ctkd.stages.ActiveStage, one process)."""
    exp = SimpleNamespace(distiller=distiller, device=torch.device("cpu"), ctx=DistributedContext())
    with ActiveStage(exp, 0, stage, sgd="loop", fp16=False) as active:
        active.set_modes()
        terms = active.losses(batch, STEP).losses
        active.optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        active.optimizer.step()
    return terms


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _moved(before: dict[str, Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.slow
def test_ab_init_stage_moves_the_students_layers_and_the_connectors_only() -> None:
    distiller, batch = _real("ab", AB.Options(), teacher="wrn_16_2")
    method = distiller.unwrapped
    assert [c[0].kernel_size for c in method.connectors] == [(1, 1)] * 3  # 16→32, 32→64, 64→128 channels, same size
    before, head = _snapshot(method.student), _snapshot(method.connectors)
    terms = _stage_step(distiller, batch, method.stages()[0])
    assert list(terms) == ["loss_ab"] and torch.isfinite(terms["loss_ab"]) and terms["loss_ab"].item() > 0
    assert _moved(head, method.connectors) and "conv1.weight" in _moved(before, method.student)
    assert not any(p.requires_grad for p in method.connectors.parameters())  # frozen again for distillation
    assert method.student.fc.weight.grad is None  # the classifier is not on AB's path: untouched, as RepDistiller
    assert all(p.grad is None for p in distiller.teacher.parameters())
    out = distiller(batch, STEP)  # distillation at RepDistiller's β = 0: CE + KD only
    assert "loss_ab" not in out.losses and set(out.losses) == {"loss_ce", "loss_kd"}


def test_ab_with_a_distillation_weight_trains_student_and_connectors() -> None:
    distiller, batch = _real("ab", AB.Options(weight=1.0), teacher="wrn_16_2")
    out = distiller(batch, STEP)
    assert torch.isfinite(out.losses["loss_ab"])
    out.losses["loss_ab"].backward()
    method = distiller.unwrapped
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.connectors.parameters())
    assert method.student.conv1.weight.grad.abs().sum() > 0
    assert method.temperature.parameters().__next__().grad is None  # τ is not on AB's path


@pytest.mark.slow
def test_ab_with_a_torchvision_student_fails_before_training_naming_it(tmp_path: Path, teacher_file: Path) -> None:
    data = ctkd_config(tmp_path, teacher_file, student={"name": "torchvision.resnet18"})
    data["method"] = {"name": "ab"}
    cfg = load(data, tmp_path)
    student = models.build_model("torchvision.resnet18", num_classes=10)
    teacher = models.build_model("resnet14", num_classes=10)
    with pytest.raises(ConfigError, match=r"method ab distils pre-activation .*torchvision\.resnet18"):
        check_preact_features(cfg, AB, student, teacher)


# ------------------------------------------------------------------------------------------------ FT
FT_STUDENT = [(3, 8, 8), (6, 8, 8), (8,)]  # stem, last stage (pooled 8×8 → 4×4 to meet the teacher's), vector
FT_TEACHER = [(3, 8, 8), (10, 4, 4), (10,)]


def _phi(f: Tensor, mode: str) -> Tensor:
    flat = (f ** 2).mean(1).flatten(1) if mode == "squared_channel_mean" else f.flatten(1)
    return flat / flat.pow(2).sum(1, keepdim=True).sqrt()


def _ft_reference(method: FT, s: Tensor, t: Tensor, p: int, mode: str) -> Tensor:
    """RepDistiller's FT in float64: translator (conv, BN, leaky ×3), encoder (conv, leaky ×3), 2×2 block means."""
    x = s.double()
    for i in (0, 3, 6):
        x = _leaky64(_bn64(_conv64(x, method.translator[i]), method.translator[i + 1]))
    y = t.double()
    for i in (0, 2, 4):
        y = _leaky64(_conv64(y, method.paraphraser.encoder[i]))
    b, c, _, _ = x.shape
    x = x.reshape(b, c, 4, 2, 4, 2).mean((3, 5))
    diff = _phi(x, mode) - _phi(y, mode)
    return diff.abs().mean() if p == 1 else (diff ** 2).mean()


@pytest.mark.parametrize("p,mode", [(1, "squared_channel_mean"), (2, "squared_channel_mean"), (1, "vector")])
def test_ft_loss_and_its_gradient_match_float64_formula(p: int, mode: str) -> None:
    torch.manual_seed(0)
    method = _method(FT, FT.Options(weight=3.0, p=p, factor=mode), FT_STUDENT, FT_TEACHER).train()
    assert not any(q.requires_grad for q in method.paraphraser.parameters())  # frozen outside its stage
    method.paraphraser.requires_grad_(True)  # even unfrozen, the teacher's factor is a fixed target
    assert method.translator[3].out_channels == 5 and method.paraphraser.encoder[2].out_channels == 5  # k = 0.5
    student, teacher = _features(FT_STUDENT, 0, grad=True), _features(FT_TEACHER, 10)
    got = method.loss_terms(_step(student, teacher))
    assert list(got) == ["loss_ft"]
    double = student[1].detach().double().requires_grad_()
    expected = 3.0 * _ft_reference(method, double, teacher[1], p, mode)
    assert got["loss_ft"].item() == pytest.approx(expected.item(), rel=1e-5)
    got["loss_ft"].backward()
    expected.backward()
    _assert_grad_close(student[1].grad, double.grad)
    assert all(q.grad is None for q in method.paraphraser.parameters())  # frozen: no gradient reaches it


def test_ft_reconstruction_stage_matches_float64_mse_and_trains_the_paraphraser_alone() -> None:
    method = _method(FT, FT.Options(), FT_STUDENT, FT_TEACHER)
    student, teacher = _features(FT_STUDENT, 0, grad=True), _features(FT_TEACHER, 10)
    stage = method.stages()[0]
    assert stage == Stage("ft_init", 30, ("paraphraser",), 0.01, 0.9, 5e-4)
    method.paraphraser.requires_grad_(True)  # as the stage runner does for what the stage trains
    got = method.stage_loss_terms(stage, _step(student, teacher))
    y = teacher[1].double()
    for conv in (*method.paraphraser.encoder[::2], *method.paraphraser.decoder[::2]):
        y = _leaky64(_conv64(y, conv))
    assert got["loss_ft_rec"].item() == pytest.approx(((y - teacher[1].double()) ** 2).mean().item(), rel=1e-5)
    got["loss_ft_rec"].backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in method.paraphraser.parameters())
    assert all(q.grad is None for q in method.translator.parameters()) and student[1].grad is None


def test_ft_loss_is_zero_for_equal_factors_and_blind_to_their_scale() -> None:
    fs, ft = _randn(0, 4, 5, 4, 4), _randn(1, 4, 5, 4, 4)
    for mode in ("squared_channel_mean", "vector"):
        assert ft_loss(ft, ft, 1, mode).item() == 0.0
        assert ft_loss(3 * fs, ft, 1, mode).item() == pytest.approx(ft_loss(fs, ft, 1, mode).item(), rel=1e-6)
    options = FT.Options()
    assert (options.weight, options.rate, options.p, options.factor, options.init_epochs) == (
        200.0, 0.5, 1, "squared_channel_mean", 30)
    assert FT.uses_tau is False and not FT.preact and FT.paper == "Kim et al., NeurIPS 2018"


def test_ft_refuses_options_and_shapes_it_cannot_use() -> None:
    with pytest.raises(ConfigError, match="rate"):
        _method(FT, FT.Options(rate=0.05), FT_STUDENT, FT_TEACHER)
    with pytest.raises(ConfigError, match=r"method ft compares 1×1 factors"):
        _method(FT, FT.Options(), [(3, 8, 8), (6, 1, 1), (6,)], FT_TEACHER)
    with pytest.raises(ConfigError, match="p"):
        FT.Options(p=3)


@pytest.mark.slow  # the first optimizer of a process imports torch._dynamo (seconds)
def test_ft_distillation_step_moves_student_and_translator_never_the_paraphraser() -> None:
    distiller, batch = _real("ft", FT.Options())
    method = distiller.unwrapped
    before = {name: _snapshot(getattr(method, name)) for name in ("student", "translator", "paraphraser")}
    stage_terms = _stage_step(distiller, batch, method.stages()[0])
    assert torch.isfinite(stage_terms["loss_ft_rec"]) and stage_terms["loss_ft_rec"].item() > 0
    assert _moved(before["paraphraser"], method.paraphraser) and not _moved(before["student"], method.student)
    assert not _moved(before["translator"], method.translator)
    optimizer = build_sgd(method, lr=0.05, momentum=0.9, weight_decay=5e-4)  # the run's: every parameter, decay
    before = {name: _snapshot(getattr(method, name)) for name in ("student", "translator", "paraphraser")}
    optimizer.zero_grad(set_to_none=True)
    out = distiller(batch, STEP)
    assert torch.isfinite(out.losses["loss_ft"]) and out.losses["loss_ft"].item() > 0
    sum(out.losses.values()).backward()
    optimizer.step()
    assert _moved(before["student"], method.student) and _moved(before["translator"], method.translator)
    assert not _moved(before["paraphraser"], method.paraphraser)
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.slow
def test_ft_with_a_torchvision_student() -> None:
    """torchvision resnet18 ends in a 1×1 map at 32×32: RepDistiller's factor refuses it clearly, the paper's works."""
    with pytest.raises(ConfigError, match=r"1×1 factors .*ResNet"):
        _real("ft", FT.Options(), student="torchvision.resnet18")
    distiller, batch = _real("ft", FT.Options(factor="vector"), student="torchvision.resnet18")
    out = distiller(batch, STEP)
    out.losses["loss_ft"].backward()
    assert torch.isfinite(out.losses["loss_ft"]) and distiller.unwrapped.translator[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ end to end
def _config(tmp_path: Path, teacher_file: Path, method: dict, **sections: dict) -> Path:
    """A one-epoch tiny run (resnet14 → resnet8) of `method`, written as tmp_path/run.yaml; its output: tmp_path/run."""
    data = ctkd_config(tmp_path, teacher_file, epochs=1, data={"train_size": 64, "test_size": 32},
                       logging={"tensorboard": False}, **sections)
    return write_yaml(tmp_path / "run.yaml", {**data, "method": method})


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name,stage_key,key", [("ab", "train_loss_ab", None),
                                               ("ft", "train_loss_ft_rec", "train_loss_ft")])
def test_a_run_trains_the_init_stage_then_distils(tmp_path: Path, teacher_file: Path, name: str, stage_key: str,
                                                  key: str | None) -> None:
    """One init-stage epoch (run epoch 0) with its own loss alone, then one distillation epoch (AB: CE + KD only)."""
    trainer.run(load_config(_config(tmp_path, teacher_file, {"name": name, "init_epochs": 1, "init_lr": 0.01})))
    stage, distil = _records(tmp_path)
    assert (stage["epoch"], stage["stage"], stage["stage_epoch"]) == (0, f"{name}_init", 1)
    assert math.isfinite(stage[stage_key]) and stage[stage_key] > 0 and "train_loss_ce" not in stage
    assert distil["epoch"] == 1 and "stage" not in distil and math.isfinite(distil["train_loss_ce"])
    assert (key in distil and math.isfinite(distil[key])) if key else not any(k.endswith("_ab") for k in distil)


@pytest.mark.slow
def test_ft_trains_its_stage_and_distils_under_two_processes(tmp_path: Path, teacher_file: Path) -> None:
    """The paraphraser, frozen in distillation, is no parameter DDP waits for (unfrozen, the second step fails with
    'Expected to have finished reduction in the prior iteration')."""
    config = _config(tmp_path, teacher_file, {"name": "ft", "init_epochs": 1}, distributed={"timeout_s": 60.0})
    mp.spawn(spawned_run, args=(2, free_port(), str(config)), nprocs=2, join=True)
    records = _records(tmp_path)
    assert [r.get("stage") for r in records] == ["ft_init", None]
    assert math.isfinite(records[0]["train_loss_ft_rec"]) and math.isfinite(records[1]["train_loss_ft"])


@pytest.mark.parametrize("name", ["ab", "fsp"])
def test_at_weight_zero_distillation_computes_no_features(name: str) -> None:
    """RepDistiller's AB and FSP act in their init stage only: a distillation step then needs no feature map of
    either network (the stage asks for its own), and computes none."""
    from conftest import zoo_distiller
    from ctkd.methods import METHODS

    method = METHODS.get(name)
    idle, batch = zoo_distiller(method.Options(weight=0.0), "resnet8", "resnet14")
    assert idle.teacher_output(batch.images).features == [] and not idle.unwrapped.features
    active, _ = zoo_distiller(method.Options(weight=1.0), "resnet8", "resnet14")
    assert len(active.teacher_output(batch.images).features) == 5 and active.unwrapped.features
