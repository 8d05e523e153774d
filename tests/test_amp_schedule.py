"""Mixed precision (runtime.amp), channels_last and the per-iteration LR schedules (warm-up, cosine) on CPU."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_mlp: fp16 convolutions are slow on CPU)
from conftest import ctkd_config, load, train_epoch
from ctkd import trainer
from ctkd.build import Experiment, build_experiment
from ctkd.config import RuntimeConfig
from ctkd.datasets.loader import Batch
from ctkd.distributed import DistributedContext
from ctkd.errors import ConfigError
from ctkd.losses import kd_loss
from ctkd.methods import StepContext
from ctkd.methods.base import resolve_channels_last
from ctkd.optim import LRMultiplier, build_lr_schedule, build_sgd, load_optimizer_state
from ctkd.system import seed_everything
from ctkd.trainer import run

STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)
BF16_LOSS_RTOL = 5e-3  # bf16 keeps 8 mantissa bits; the fixed batch's KD+CTKD loss moves by ~3e-4 relative


def _experiment(cfg) -> Experiment:
    """The run's objects, with the weights a run of `cfg` would start from."""
    seed_everything(cfg.seed)
    return build_experiment(cfg, DistributedContext())


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


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("epoch_time")
    return rows


# ------------------------------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("temperature", ["global", "instance"])
def test_bf16_autocasts_the_networks_and_keeps_loss_and_tau_in_fp32(
    tmp_path: Path, teacher_file: Path, temperature: str
) -> None:
    base = ctkd_config(tmp_path, teacher_file, temperature={"name": temperature})
    fp32 = _experiment(load(base, tmp_path, "fp32.yaml"))
    bf16 = _experiment(load({**base, "runtime": {"amp": "bf16"}}, tmp_path, "bf16.yaml"))
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
    exp = _experiment(cfg)
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


def test_fp16_run_resumes_bit_identically_with_its_grad_scaler(
    tmp_path: Path, mlp_teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU autocast supports fp16 and torch.amp.GradScaler("cpu") exists (torch ≥ 2.3), so fp16 runs on CPU too."""
    straight = load(_fp16_config(tmp_path, mlp_teacher_file, "straight"), tmp_path, "a.yaml")
    run(straight)
    state = torch.load(Path(straight.output_dir) / "last.pth", weights_only=True)
    scaler_state = state["grad_scaler"]
    assert set(scaler_state) >= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    assert scaler_state["_growth_tracker"] > 0 or scaler_state["scale"] != 2.0**16  # the scaler has run

    crashed = load(_fp16_config(tmp_path, mlp_teacher_file, "crashed"), tmp_path, "b.yaml")
    _run_crashing_in_epoch(crashed, 2, monkeypatch)
    saved = torch.load(Path(crashed.output_dir) / "last.pth", weights_only=True)["grad_scaler"]
    restored = []
    real_load = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, s: (restored.append(dict(s)), real_load(self, s))[1])
    run(crashed, resume="auto")
    assert restored == [saved]  # the resume put the scaler back where epoch 1 left it
    resumed = torch.load(Path(crashed.output_dir) / "last.pth", weights_only=True)
    assert _hash(resumed["trainable"]) == _hash(state["trainable"])
    assert resumed["grad_scaler"] == scaler_state
    assert _metrics(Path(crashed.output_dir)) == _metrics(Path(straight.output_dir))


def test_a_step_the_grad_scaler_skips_is_not_an_error(tmp_path: Path, mlp_teacher_file: Path) -> None:
    cfg = load(_fp16_config(tmp_path, mlp_teacher_file, "run"), tmp_path)
    exp = _experiment(cfg)
    before = _hash(exp.distiller.unwrapped.state_dict())
    batch = _first_batch(exp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # finite fp32 loss, inf fp16 gradients
    exp.scaler = scaler
    train_epoch(exp, cfg, [batch, batch])
    assert scaler.get_scale() == 2.0**98  # both steps skipped, the scale backed off twice
    assert _hash(exp.distiller.unwrapped.state_dict()) == before  # and no update was applied


# ------------------------------------------------------------------------------------------------ channels_last
def _runtime(cfg: dict, **runtime: object) -> dict:
    """`cfg` with these runtime.* keys set (the others kept)."""
    return {**cfg, "runtime": {**cfg.get("runtime", {}), **runtime}}


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
    exp = _experiment(load(ctkd_config(tmp_path, teacher_file), tmp_path))
    assert exp.distiller.runtime.channels_last
    convs = [m for part in (exp.distiller.student, exp.distiller.teacher) for m in part.modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


@pytest.mark.parametrize("method", ["kd", "vid"])
def test_channels_last_matches_the_contiguous_layout(tmp_path: Path, teacher_file: Path, method: str) -> None:
    base = ctkd_config(tmp_path, teacher_file, method=method)
    dense_cfg = load(_runtime(base, channels_last="off"), tmp_path, "dense.yaml")
    nhwc_cfg = load(_runtime(base, channels_last=True), tmp_path, "nhwc.yaml")
    dense, nhwc = _experiment(dense_cfg), _experiment(nhwc_cfg)
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


# ------------------------------------------------------------------------------------------------ LR schedules
def _multiplier(t: int, *, warmup: int, total: int, start: float, min_factor: float) -> float:
    """The documented curve: linear warm-up from `start` to 1 over `warmup` iterations, then cosine to min_factor."""
    if t < warmup:
        return start + (1 - start) * t / warmup
    return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2


def test_cosine_with_warmup_follows_the_formula_in_every_group(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(
        tmp_path, teacher_file, optimizer={"lr": 0.05, "schedule": "cosine", "warmup_epochs": 1.5,
                                           "warmup_start_factor": 0.01, "min_lr": 0.005},
        temperature={"name": "global", "lr": 0.02},
    ), tmp_path)
    exp = _experiment(cfg)
    steps, epochs = len(exp.train_loader), cfg.epochs
    assert steps == 5 and [g["name"] for g in exp.optimizer.param_groups] == ["student", "temperature"]
    warmup, total = 8, steps * epochs  # round(1.5 · 5) iterations of warm-up
    lrs = []
    for epoch in range(1, epochs + 1):
        exp.schedule.set_epoch(epoch)
        for _ in range(steps):
            lrs.append([g["lr"] for g in exp.optimizer.param_groups])
            exp.optimizer.step()
            exp.schedule.step()
    for t in (0, 1, 4, 7, 8, 9, 11, 14):  # in and out of the warm-up, across epoch boundaries, the last iteration
        m = _multiplier(t, warmup=warmup, total=total, start=0.01, min_factor=0.005 / 0.05)
        assert lrs[t] == pytest.approx([0.05 * m, 0.02 * m], rel=1e-12), t  # the temperature's LR: same factor
    assert lrs[warmup][0] == pytest.approx(0.05, rel=1e-12) and lrs[-1][0] > 0.005


def test_step_schedule_with_warmup_is_exactly_the_step_schedule_after_it() -> None:
    from ctkd.config import OptimizerConfig

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    options = OptimizerConfig(lr=0.1, lr_decay_epochs=(3,), lr_decay_rate=0.1, warmup_epochs=1.0,
                              warmup_start_factor=0.1)
    schedule = build_lr_schedule(optimizer, options, steps_per_epoch=4, epochs=4)
    lrs = []
    for epoch in range(1, 5):
        schedule.set_epoch(epoch)
        for _ in range(4):
            lrs.append(optimizer.param_groups[0]["lr"])
            schedule.step()
    assert lrs[:4] == pytest.approx([0.01, 0.0325, 0.055, 0.0775], rel=1e-12)
    assert lrs[4:12] == [0.1] * 8 and lrs[12:] == [0.1 * 0.1] * 4  # bit-exact: base · rate^k · 1.0
    no_warmup = build_lr_schedule(optimizer, OptimizerConfig(lr=0.1), steps_per_epoch=4, epochs=4)
    assert no_warmup.multiplier is None  # the paper's schedule: nothing per iteration


def test_lr_multiplier_state_round_trip_continues_exactly() -> None:
    def fresh() -> LRMultiplier:
        return LRMultiplier(warmup_iters=3, start_factor=0.001, cosine_iters=7, min_factor=0.1)

    straight, values = fresh(), []
    for _ in range(10):
        values.append(straight.value)
        straight.step()
    first = fresh()
    for _ in range(5):
        first.step()
    state = first.state_dict()
    second = fresh()
    second.load_state_dict(state)
    resumed = [values[i] for i in range(5)]
    for _ in range(5):
        resumed.append(second.value)
        second.step()
    assert resumed == values  # bit-identical


def _run_crashing_in_epoch(cfg, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real_train = trainer.Trainer.train_epoch

    def crash(self, epoch_run, *args, **kwargs):
        if epoch_run.epoch == epoch:
            raise KeyboardInterrupt(f"simulated kill during epoch {epoch}")
        return real_train(self, epoch_run, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "train_epoch", crash)
    with pytest.raises(trainer.RunInterrupted):
        run(cfg)
    monkeypatch.setattr(trainer.Trainer, "train_epoch", real_train)


def test_cosine_warmup_run_resumes_bit_identically(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = {"epochs": 2, "optimizer": {"schedule": "cosine", "warmup_epochs": 0.6, "min_lr": 0.001}}
    straight = load(ctkd_config(tmp_path, teacher_file, "straight", **sections), tmp_path, "a.yaml")
    run(straight)
    expected = torch.load(Path(straight.output_dir) / "last.pth", weights_only=True)
    assert expected["lr_scheduler"] is not None and expected["grad_scaler"] is None
    lrs = [row["lr"] for row in _metrics(Path(straight.output_dir))]  # the LR of each epoch's first iteration
    assert lrs == pytest.approx([0.05 * 0.001, _multiplier(5, warmup=3, total=10, start=0.001, min_factor=0.02)
                                 * 0.05], rel=1e-9)

    crashed = load(ctkd_config(tmp_path, teacher_file, "crashed", **sections), tmp_path, "b.yaml")
    _run_crashing_in_epoch(crashed, 2, monkeypatch)
    run(crashed, resume="auto")
    resumed = torch.load(Path(crashed.output_dir) / "last.pth", weights_only=True)
    assert _hash(resumed["trainable"]) == _hash(expected["trainable"])
    for a, b in zip(expected["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert resumed["lr_scheduler"] == expected["lr_scheduler"]
    assert _metrics(Path(crashed.output_dir)) == _metrics(Path(straight.output_dir))

    # the scheduler's state is what makes it exact: a resume that ignores it restarts the warm-up
    forgetful = load(ctkd_config(tmp_path, teacher_file, "forgetful", **sections), tmp_path, "c.yaml")
    _run_crashing_in_epoch(forgetful, 2, monkeypatch)
    monkeypatch.setattr(LRMultiplier, "load_state_dict", lambda self, state: None)
    run(forgetful, resume="auto")
    wrong = torch.load(Path(forgetful.output_dir) / "last.pth", weights_only=True)
    assert _hash(wrong["trainable"]) != _hash(expected["trainable"])


def test_cosine_run_refuses_to_resume_with_other_epochs(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = {"epochs": 2, "optimizer": {"schedule": "cosine"}}
    cfg = load(ctkd_config(tmp_path, teacher_file, **sections), tmp_path, "a.yaml")
    _run_crashing_in_epoch(cfg, 2, monkeypatch)
    longer = load(ctkd_config(tmp_path, teacher_file, **{**sections, "epochs": 3}), tmp_path, "b.yaml")
    with pytest.raises(ConfigError, match="epochs"):
        run(longer, resume="auto")


def test_momentum_follows_the_parameter_layout_when_a_resume_changes_it() -> None:
    """A checkpoint's momentum keeps the layout it was saved in; the fused SGD pairs weights and buffers by memory
    offset, so load_optimizer_state gives each buffer its parameter's strides (same values)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    nhwc = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    opts = [build_sgd(net, lr=0.1, momentum=0.9, weight_decay=5e-4) for net in (conv, nhwc)]  # fused
    conv(torch.randn(2, 3, 6, 6)).square().sum().backward()
    opts[0].step()
    load_optimizer_state(opts[1], opts[0].state_dict())
    nhwc.load_state_dict(conv.state_dict())
    buffer = opts[1].state[nhwc.weight]["momentum_buffer"]
    assert buffer.stride() == nhwc.weight.stride() != conv.weight.stride()
    assert torch.equal(buffer, opts[0].state[conv.weight]["momentum_buffer"])
    grad = torch.randn_like(conv.weight)
    conv.weight.grad, nhwc.weight.grad = grad.clone(), grad.contiguous(memory_format=torch.channels_last)
    conv.bias.grad = nhwc.bias.grad = torch.zeros_like(conv.bias)
    for opt in opts:
        opt.step()
    torch.testing.assert_close(nhwc.weight, conv.weight, rtol=1e-6, atol=1e-7)


def test_a_run_resumes_with_another_memory_format_and_teacher_folding(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runtime.channels_last and fold_teacher_bn may change on resume (a run checkpointed before `auto` existed
    resumes in NHWC): the run ends where the uninterrupted one does, up to float rounding."""
    before = {"channels_last": "off", "fold_teacher_bn": False}
    straight = load(ctkd_config(tmp_path, teacher_file, "straight", epochs=2, runtime=before), tmp_path, "a.yaml")
    run(straight)
    expected = torch.load(Path(straight.output_dir) / "last.pth", weights_only=True)["trainable"]
    crashed = load(ctkd_config(tmp_path, teacher_file, "crashed", epochs=2, runtime=before), tmp_path, "b.yaml")
    _run_crashing_in_epoch(crashed, 2, monkeypatch)
    after = load(ctkd_config(tmp_path, teacher_file, "crashed", epochs=2,
                             runtime={"channels_last": "on", "fold_teacher_bn": True}), tmp_path, "c.yaml")
    run(after, resume="auto")
    resumed = torch.load(Path(after.output_dir) / "last.pth", weights_only=True)["trainable"]
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed[key], value, rtol=1e-3, atol=1e-5, msg=key)
