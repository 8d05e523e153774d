"""ctkd/step: the training step without host syncs (device-side non-finite guard, λ as a tensor), under autocast
(bf16, fp16 with its scaler) and NHWC: each leaves a fixed batch's loss and updated weights within its precision."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_mlp: fp16 convolutions are slow on CPU)
from conftest import ctkd_config, first_batch_step, load, seeded_experiment, tiny_run_config, train_epoch
from ctkd.build import Experiment
from ctkd.config import RuntimeConfig
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller
from ctkd.errors import ConfigError
from ctkd.guard import NonFiniteGuard, NonFiniteLossError
from ctkd.losses import kd_loss
from ctkd.methods import StepContext
from ctkd.methods.base import resolve_channels_last
from ctkd.optim import build_sgd
from ctkd.temperatures import GlobalTemperature
from ctkd.trainer import run


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------- device-side finiteness
def _sgd_pair() -> tuple[nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    return layer, build_sgd(layer, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _guarded_step(guard: NonFiniteGuard, layer: nn.Linear, opt: torch.optim.SGD, step: int, x: torch.Tensor) -> None:
    """One step the way train_step takes it: backward, device flag, fused SGD with found_inf."""
    loss = layer(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    flag = guard.step_flag(loss, opt)
    guard.guarded_step(opt, flag)
    guard.record(step, flag, loss, {"loss_x": loss})


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_with_its_step() -> None:
    layer, opt = _sgd_pair()
    guard = NonFiniteGuard(torch.device("cpu"), epoch=3)
    good = torch.ones(2, 4)
    _guarded_step(guard, layer, opt, 0, good)
    before, momentum = _weights(layer), opt.state[layer.weight]["momentum_buffer"].clone()
    _guarded_step(guard, layer, opt, 1, torch.full((2, 4), float("nan")))
    after = _weights(layer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update, weight decay and momentum included
    assert torch.equal(opt.state[layer.weight]["momentum_buffer"], momentum)
    _guarded_step(guard, layer, opt, 2, good)
    assert not torch.equal(_weights(layer)["weight"], after["weight"])  # later good steps still update
    with pytest.raises(NonFiniteLossError, match=r"loss in step 2 of epoch 3 on rank\(s\) \[0\] \(this rank 0: loss_x"):
        guard.check()


@pytest.mark.parametrize("implementation", ["fused", "loop"])
def test_finite_gradients_of_a_finite_loss_pass_unchanged(implementation: str) -> None:
    """The check multiplies the gradients by exactly 1: a guarded step equals an unguarded step bit for bit."""
    layer, _ = _sgd_pair()
    opt = build_sgd(layer, lr=0.1, momentum=0.9, weight_decay=5e-4, implementation=implementation)
    twin, plain = _sgd_pair()
    plain = build_sgd(twin, lr=0.1, momentum=0.9, weight_decay=5e-4, implementation=implementation)
    guard = NonFiniteGuard(torch.device("cpu"), epoch=1)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(5, 4, generator=gen)
        _guarded_step(guard, layer, opt, step, x)
        loss = twin(x).square().mean()
        plain.zero_grad()
        loss.backward()
        plain.step()
    guard.check()  # nothing to report
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), twin.state_dict().values()))


def test_the_loop_sgd_skips_a_non_finite_step_too() -> None:
    layer, _ = _sgd_pair()
    opt = build_sgd(layer, lr=0.1, momentum=0.9, weight_decay=5e-4, implementation="loop")
    guard = NonFiniteGuard(torch.device("cpu"), epoch=1)
    _guarded_step(guard, layer, opt, 0, torch.ones(2, 4))
    before = _weights(layer)
    _guarded_step(guard, layer, opt, 1, torch.full((2, 4), float("nan")))
    assert all(torch.equal(before[k], v) for k, v in _weights(layer).items())


def test_non_finite_gradients_with_a_finite_loss_are_named_as_such() -> None:
    layer, opt = _sgd_pair()
    guard = NonFiniteGuard(torch.device("cpu"), epoch=1)
    loss = layer(torch.ones(2, 4)).sum()
    loss.backward()
    layer.bias.grad[0] = float("inf")
    flag = guard.step_flag(loss, opt)
    guard.record(0, flag, loss, {"loss_x": loss})
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients in step 1 of epoch 1 \(the loss was finite"):
        guard.check()


def _diverging(tmp_path: Path, every_steps: int) -> tuple[Path, str]:
    """resnet8 at LR 2000: BatchNorm's running variances overflow in the first epoch, before the loss does."""
    from conftest import write_yaml
    from ctkd.config import load_config

    data = tiny_run_config(tmp_path, "diverging", epochs=2, optimizer={"lr": 2000.0, "lr_decay_epochs": [100]},
                           checkpoint={"every_steps": every_steps, "keep_last": 100}, logging={"interval": 1})
    with pytest.raises(NonFiniteLossError) as info:
        run(load_config(write_yaml(tmp_path / "diverging.yaml", data)))
    return tmp_path / "diverging", str(info.value)


def test_a_diverging_run_never_checkpoints_a_non_finite_buffer(tmp_path: Path) -> None:
    """The loss stays finite while BatchNorm statistics already are inf: buffers count as non-finite too, so every
    checkpoint the run wrote is finite, and the message names the newest one (the step before the bad one)."""
    run_dir, message = _diverging(tmp_path, every_steps=1)
    saved = sorted(run_dir.glob("*.pth"))
    assert len(saved) >= 3  # some steps were checkpointed before the divergence
    for path in saved:
        state = torch.load(path, weights_only=True)["trainable"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name
    assert "non-finite BatchNorm statistics (buffers) in step " in message
    newest = sorted(run_dir.glob("ckpt-*.pth"))[-1]
    assert f"the newest checkpoint, {newest} " in message and "holds the last finite state" in message


def test_a_run_that_diverges_before_any_checkpoint_says_so(tmp_path: Path) -> None:
    run_dir, message = _diverging(tmp_path, every_steps=0)
    assert not list(run_dir.glob("*.pth")) and message.endswith("no checkpoint had been written yet")


def test_the_flags_are_read_once_per_interval_not_every_step(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 160 samples / 32 = 5 steps
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1, logging={"interval": 2}), tmp_path)
    exp = seeded_experiment(cfg)
    reads = []
    original = NonFiniteGuard.check
    monkeypatch.setattr(NonFiniteGuard, "check", lambda self: (reads.append(1), original(self)))
    train_epoch(exp, cfg, grl_lambda=0.5)
    assert len(reads) == 5 // 2 + 1  # after steps 2 and 4, and at the end of the epoch


# --------------------------------------------------------------------------------------------------- λ as a tensor
def test_lambda_as_a_device_tensor_gives_the_float_lambda_gradients() -> None:
    grads = []
    for grl_lambda in (0.3455, torch.tensor(0.3455)):
        module = GlobalTemperature(t_start=1.0, t_range=20.0)
        tau = module(torch.zeros(2, 5), torch.zeros(2, 5), grl_lambda)
        (tau * 2.5).sum().backward()
        grads.append(module.raw.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].item() < 0  # reversed: τ ascends the loss


def test_the_epoch_loop_turns_lambda_into_a_tensor(tmp_path: Path, teacher_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original = Distiller.__call__
    monkeypatch.setattr(Distiller, "__call__", lambda self, batch, ctx: (seen.append(ctx.grl_lambda),
                                                                              original(self, batch, ctx))[1])
    run(load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path))
    assert seen and all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in seen)


# ------------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_leaves_the_loss_and_the_step_within_fp32_tolerance(tmp_path: Path, teacher_file: Path) -> None:
    """runtime.compile (inductor on CPU): the same loss on a fixed batch and the same weights after one step."""
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path)
    results = []
    for mode in (None, "default"):
        exp = seeded_experiment(cfg)
        if mode is not None:
            exp.distiller.compile(mode)
        losses, weights = first_batch_step(exp, grl_lambda=0.5)
        results.append((sum(losses.values()), weights))
    (loss_a, weights_a), (loss_b, weights_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert weights_a.keys() == weights_b.keys()  # compiled in place: the checkpoint keys do not change
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-4, atol=1e-5)


def test_fused_and_foreach_sgd_are_the_loop_sgd_within_float_rounding() -> None:
    """runtime.sgd: fused (the default, needed for the device-side skip) and foreach compute the loop's update (the
    authors') up to float32 rounding, both parameter groups included; the loop is kept for bit-exact comparisons."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    base.temperature = GlobalTemperature(t_start=1.0, t_range=20.0)
    nets = {name: copy.deepcopy(base) for name in ("fused", "foreach", "loop")}
    opts = {name: build_sgd(net, lr=0.05, momentum=0.9, weight_decay=5e-4, temperature_lr=0.01,
                            implementation=name) for name, net in nets.items()}
    assert opts["fused"].defaults["fused"] and opts["foreach"].defaults["foreach"]
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in base.parameters()]
        for name, net in nets.items():
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opts[name].step()
    for name in ("fused", "foreach"):
        for p, q in zip(nets[name].parameters(), nets["loop"].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- host allocator
STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)


BF16_LOSS_RTOL = 5e-3  # bf16 keeps 8 mantissa bits; the fixed batch's KD+CTKD loss moves by ~3e-4 relative


def _first_batch(exp: Experiment) -> Batch:
    exp.train_loader.sampler.set_epoch(1)
    return next(iter(exp.train_loader))


def _total(losses: dict[str, Tensor]) -> Tensor:
    return sum(losses.values())


def _hash(state: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def mlp_teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny_mlp teacher (fp16 convolutions are slow on CPU; fp16 linear layers are not)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("mlp_teacher") / "tiny_mlp.pth"
    torch.save({"model": models.build_model("tiny_mlp", num_classes=10).state_dict()}, path)
    return path


def _fp16_config(tmp_path: Path, teacher: Path, name: str) -> dict:
    return ctkd_config(tmp_path, teacher, name, student={"name": "tiny_mlp"}, runtime={"amp": "fp16"}, epochs=2,
                       teacher={"name": "tiny_mlp", "checkpoint": str(teacher)})


# ------------------------------------------------------------------------------------------------ channels_last
def _runtime(cfg: dict, **runtime: object) -> dict:
    """`cfg` with these runtime.* keys set (the others kept)."""
    return {**cfg, "runtime": {**cfg.get("runtime", {}), **runtime}}


# ------------------------------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("temperature", ["global", "instance"])
def test_bf16_autocasts_the_networks_and_keeps_loss_and_tau_in_fp32(
    tmp_path: Path, teacher_file: Path, temperature: str
) -> None:
    base = ctkd_config(tmp_path, teacher_file, temperature={"name": temperature})
    fp32 = seeded_experiment(load(base, tmp_path, "fp32.yaml"))
    bf16 = seeded_experiment(load({**base, "runtime": {"amp": "bf16"}}, tmp_path, "bf16.yaml"))
    assert _hash(fp32.distiller.unwrapped.state_dict()) == _hash(bf16.distiller.unwrapped.state_dict())
    batch = _first_batch(fp32)

    network_dtypes = []
    for net in (bf16.distiller.student, bf16.distiller.teacher):
        net.register_forward_hook(lambda module, args, out: network_dtypes.append(out.dtype))
    reference = fp32.distiller(batch, STEP)
    out = bf16.distiller(batch, STEP)

    assert network_dtypes == [torch.bfloat16, torch.bfloat16]  # autocast ran in both forwards (teacher first)
    assert out.logits.dtype == torch.float32  # the networks' outputs leave them in fp32
    assert all(loss.dtype == torch.float32 for loss in out.losses.values())
    assert out.stats["tau"].dtype == torch.float32
    temperature_module = bf16.distiller.unwrapped.temperature
    assert all(p.dtype == torch.float32 for p in temperature_module.parameters())
    got, expected = _total(out.losses).item(), _total(reference.losses).item()
    assert got != expected  # bf16 really changed the numbers ...
    assert got == pytest.approx(expected, rel=BF16_LOSS_RTOL)  # ... only slightly
    # plain floats: pytest.approx does not take tensors (pytest ≥ 9.2 iterates a 0-d one and fails)
    assert out.stats["tau"].float().tolist() == pytest.approx(reference.stats["tau"].tolist(), rel=BF16_LOSS_RTOL)

    _total(out.losses).backward()  # gradients reach τ in fp32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in temperature_module.parameters())
    assert bf16.scaler is None


def test_amp_off_equals_a_plain_forward_bit_for_bit(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file, runtime={"amp": "off", "channels_last": False}), tmp_path)
    exp = seeded_experiment(cfg)
    batch = _first_batch(exp)
    exp.distiller.train()
    out = exp.distiller(batch, STEP)

    method, teacher = exp.distiller.unwrapped, exp.distiller.teacher
    logits = method.student(batch.images)
    with torch.no_grad():
        teacher_logits = teacher(batch.images)
    tau = method.temperature(logits, teacher_logits, 1.0)
    assert torch.equal(out.logits, logits)
    assert torch.equal(out.losses["loss_ce"], cfg.loss.ce_weight * F.cross_entropy(logits, batch.targets))
    assert torch.equal(out.losses["loss_kd"], cfg.loss.kd_weight * kd_loss(logits, teacher_logits, tau))
    assert exp.scaler is None and exp.schedule.multiplier is None


def test_a_step_the_grad_scaler_skips_is_not_an_error(tmp_path: Path, mlp_teacher_file: Path) -> None:
    cfg = load(_fp16_config(tmp_path, mlp_teacher_file, "run"), tmp_path)
    exp = seeded_experiment(cfg)
    before = _hash(exp.distiller.unwrapped.state_dict())
    batch = _first_batch(exp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # finite fp32 loss, inf fp16 gradients
    exp.scaler = scaler
    train_epoch(exp, cfg, [batch, batch])
    assert scaler.get_scale() == 2.0**98  # both steps skipped, the scale backed off twice
    assert _hash(exp.distiller.unwrapped.state_dict()) == before  # and no update was applied


def test_channels_last_auto_is_nhwc_on_cpu_and_under_cuda_autocast() -> None:
    """CPU: oneDNN's convolutions are faster in NHWC at any precision; CUDA: NHWC only pays off on tensor cores."""
    assert resolve_channels_last("auto", "cpu", "off") and resolve_channels_last("auto", "cpu", "bf16")
    assert resolve_channels_last("auto", "cuda", "bf16") and resolve_channels_last("auto", "cuda", "fp16")
    assert not resolve_channels_last("auto", "cuda", "off")
    assert not resolve_channels_last("off", "cpu", "bf16") and resolve_channels_last("on", "cuda", "off")


def test_channels_last_reads_its_former_bool_values(tmp_path: Path, teacher_file: Path) -> None:
    """The key was a bool: configs and checkpoints' saved configs with true/false keep working as on/off."""
    base = ctkd_config(tmp_path, teacher_file)
    for value, expected in ((True, "on"), (False, "off"), ("auto", "auto")):
        assert load(_runtime(base, channels_last=value), tmp_path).runtime.channels_last == expected
    assert RuntimeConfig().channels_last == "auto" and RuntimeConfig(channels_last=False).channels_last == "off"
    with pytest.raises(ConfigError, match=r"runtime\.channels_last' must be one of auto, on, off; got 'yes'"):
        load(_runtime(base, channels_last="yes"), tmp_path)


def test_the_default_config_trains_in_nhwc_on_cpu(tmp_path: Path, teacher_file: Path) -> None:
    exp = seeded_experiment(load(ctkd_config(tmp_path, teacher_file), tmp_path))
    assert exp.distiller.runtime.channels_last
    convs = [m for part in (exp.distiller.student, exp.distiller.teacher) for m in part.modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


@pytest.mark.parametrize("method", ["kd", "vid"])
def test_channels_last_matches_the_contiguous_layout(tmp_path: Path, teacher_file: Path, method: str) -> None:
    base = ctkd_config(tmp_path, teacher_file, method=method)
    dense_cfg = load(_runtime(base, channels_last="off"), tmp_path, "dense.yaml")
    nhwc_cfg = load(_runtime(base, channels_last=True), tmp_path, "nhwc.yaml")
    dense, nhwc = seeded_experiment(dense_cfg), seeded_experiment(nhwc_cfg)
    dense_convs = [m for m in dense.distiller.student.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert not any(m.weight.is_contiguous(memory_format=torch.channels_last) for m in dense_convs)
    convs = [m for part in (nhwc.distiller.unwrapped, nhwc.distiller.teacher) for m in part.modules()
             if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    if method == "vid":  # the method's heads too
        assert any(isinstance(m, nn.Conv2d) for m in nhwc.distiller.unwrapped.regressors.modules())

    inputs = []
    first_conv = next(m for m in nhwc.distiller.student.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    batch = _first_batch(dense)
    with torch.no_grad():
        loss_dense, loss_nhwc = (_total(exp.distiller(batch, STEP).losses).item() for exp in (dense, nhwc))
    assert loss_nhwc == pytest.approx(loss_dense, rel=1e-5)
    for exp, cfg in ((dense, dense_cfg), (nhwc, nhwc_cfg)):  # one full step each
        train_epoch(exp, cfg, [batch])
    assert inputs[-1].is_contiguous(memory_format=torch.channels_last)  # the step made the images NHWC
    after_dense, after_nhwc = dense.distiller.unwrapped.state_dict(), nhwc.distiller.unwrapped.state_dict()
    for key, value in after_dense.items():
        torch.testing.assert_close(after_nhwc[key], value, rtol=1e-4, atol=1e-6, msg=key)
