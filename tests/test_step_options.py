"""The step without host syncs (device-side non-finite guard, λ as a tensor) and the step options of runtime.* and
logging.*: each leaves a fixed batch's loss and the updated weights as they were, within its precision's tolerance."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ctkd_config, first_batch_step, load, tiny_run_config, train_epoch
from ctkd.build import Experiment, build_experiment
from ctkd.distiller import Distiller
from ctkd.distributed import DistributedContext
from ctkd.guard import NonFiniteGuard, NonFiniteLossError
from ctkd.optim import build_sgd
from ctkd.system import resolve_compile_mode, seed_everything
from ctkd.temperatures import GlobalTemperature
from ctkd.trainer import run


def _experiment(cfg) -> Experiment:
    seed_everything(cfg.seed)
    return build_experiment(cfg, DistributedContext())


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
    exp = _experiment(cfg)
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
def test_compile_leaves_the_loss_and_the_step_within_fp32_tolerance(tmp_path: Path, teacher_file: Path) -> None:
    """runtime.compile (inductor on CPU): the same loss on a fixed batch and the same weights after one step."""
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path)
    results = []
    for mode in (None, "default"):
        exp = _experiment(cfg)
        if mode is not None:
            exp.distiller.compile(mode)
        losses, weights = first_batch_step(exp, grl_lambda=0.5)
        results.append((sum(losses.values()), weights))
    (loss_a, weights_a), (loss_b, weights_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert weights_a.keys() == weights_b.keys()  # compiled in place: the checkpoint keys do not change
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-4, atol=1e-5)


def test_compile_auto_is_on_for_cuda_only() -> None:
    assert resolve_compile_mode("auto", torch.device("cpu")) is None
    assert resolve_compile_mode("auto", torch.device("cuda", 0)) == "default"
    assert resolve_compile_mode("off", torch.device("cuda", 0)) is None
    assert resolve_compile_mode("reduce-overhead", torch.device("cpu")) == "reduce-overhead"


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


# ------------------------------------------------------------------------------------ evaluation and checkpoints
def test_eval_and_checkpoint_intervals(tmp_path: Path) -> None:
    """eval_every 2 over 3 epochs: epochs 2 and 3 (the last) are evaluated; checkpoint_every 2: last.pth holds epoch
    2 until the last epoch writes it; a resume from it ends with the uninterrupted run's weights."""
    sections = dict(epochs=3, logging={"tensorboard": False, "progress_bar": False, "eval_every": 2,
                                       "checkpoint_every": 2})
    cfg = load(tiny_run_config(tmp_path, "spaced", **sections), tmp_path, "spaced.yaml")
    results = run(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert ["test_acc1" in r for r in records] == [False, True, True]
    assert results["last_acc1"] == records[-1]["test_acc1"]
    assert results["best_epoch"] in (2, 3)
    final = torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)
    assert final["epoch"] == 3

    short = load(tiny_run_config(tmp_path, "short", **{**sections, "epochs": 2}), tmp_path, "short.yaml")
    run(short)
    assert torch.load(Path(short.output_dir) / "last.pth", weights_only=True)["epoch"] == 2
    longer = load(tiny_run_config(tmp_path, "short", **sections), tmp_path, "short.yaml")
    run(longer, resume="auto")
    resumed = torch.load(Path(short.output_dir) / "last.pth", weights_only=True)
    assert all(torch.equal(resumed["trainable"][k], final["trainable"][k]) for k in final["trainable"])


# ----------------------------------------------------------------------------------------------- host allocator
_FAULTS = """
import resource, sys, torch
import ctkd.models as models
from ctkd.system import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
torch.manual_seed(0)
torch.set_num_threads(1)
net = models.build_model("resnet8", num_classes=10)
x = torch.randn(32, 3, 32, 32)
def step():
    net.zero_grad()
    net(x).logsumexp(1).mean().backward()
step()  # the first step maps its memory either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def test_tune_malloc_keeps_freed_memory_for_reuse() -> None:
    """Without it glibc maps a step's activation buffers afresh each step (page faults); with it they are reused."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True)
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["default"] > 1000 and faults["tuned"] * 3 < faults["default"], faults  # 7.6k vs 0.5k here
