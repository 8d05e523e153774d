"""Resume: a stopped run continues and ends where the uninterrupted run would, bit for bit.

The matrix crosses every kind of state a run carries (student and τ, an instance-τ MLP, loader workers, an fp16 grad
scaler, a warm-up + cosine LR schedule, CRD's banks, VID's and SRRL's heads, an image-folder pipeline) with the ways a
run stops in process (at an epoch end, inside an epoch); each case also has a negative control: the same resume
without that state ends elsewhere. Below it: the ingredients of a mid-epoch resume, kill -9 of train.py at every
point, 2 processes, and resuming with other speed settings."""
from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from imagefolder import write_image_folder
from resume_tools import (
    Steps,
    _train_py,
    crash_then_resume,
    dropout_config,
    fingerprint,
    run_crashing_in_epoch,
    tensorboard_scalars,
)

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_mlp, tiny_dropout_mlp)
from conftest import ctkd_config, load, write_yaml
from ctkd import resume as resume_module
from ctkd import trainer
from ctkd.config import load_config
from ctkd.datasets.loader import EpochBatchSampler
from ctkd.distiller import Distiller
from ctkd.distributed import shutdown_distributed
from ctkd.optim import LRMultiplier
from ctkd.series import check_run_checkpoint
from ctkd.totals import EpochTotals
from ctkd.trainer import run

pytestmark = pytest.mark.slow  # every test here trains whole runs


# ------------------------------------------------------------------------------------------------ the matrix
@dataclass(frozen=True)
class Case:
    """One kind of state: the config that carries it, what its checkpoint must hold, and how to forget it."""

    config: Callable[[Path, dict[str, Path], str], dict]
    holds: Callable[[dict], None] = lambda state: None
    forget: Callable[[pytest.MonkeyPatch], None] | None = None
    files: tuple[str, ...] = field(default=("teacher",))


def _ctkd(**sections: Any) -> Callable[[Path, dict[str, Path], str], dict]:
    """The tiny CTKD run (resnet14 → resnet8, 5 steps an epoch, 2 epochs) with `sections` on top."""
    def config(root: Path, teachers: dict[str, Path], name: str) -> dict:
        data = ctkd_config(root, teachers["teacher"], name, epochs=2, checkpoint={"every_steps": 2}, **sections)
        data["logging"]["tensorboard"] = True
        return data
    return config


def _with_method(method: dict, **sections: Any) -> Callable[[Path, dict[str, Path], str], dict]:
    """The tiny CTKD run with a whole `method:` section (ctkd_config merges only dict sections of its base)."""
    base = _ctkd(**sections)
    return lambda root, teachers, name: {**base(root, teachers, name), "method": method}


def _fp16(root: Path, teachers: dict[str, Path], name: str) -> dict:
    """tiny_mlp → tiny_mlp under fp16 autocast (a linear fp16 model is quick on CPU), with its grad scaler."""
    teacher = {"name": "tiny_mlp", "checkpoint": str(teachers["mlp"])}
    return _ctkd(student={"name": "tiny_mlp"}, teacher=teacher, runtime={"amp": "fp16"})(root, teachers, name)


def _image_folder(root: Path, teachers: dict[str, Path], name: str) -> dict:
    """KD + CTKD from a ResNet18 file to torchvision's resnet18 on 15 generated JPEGs at 32 px, decoded by 2 workers."""
    data = {"name": "imagenet", "root": str(teachers["images"]), "num_classes": 3, "image_size": 32,
            "resize_size": 36, "batch_size": 4, "num_workers": 2}
    return {"output_dir": str(root / name), "seed": 0, "device": "cpu", "epochs": 2, "method": "kd", "data": data,
            "student": {"name": "torchvision.resnet18"},
            "teacher": {"name": "ResNet18", "checkpoint": str(teachers["resnet18"])},
            "loss": {"ce_weight": 1.0, "kd_weight": 1.0}, "temperature": {"name": "global"},
            "curriculum": {"loops": 5}, "checkpoint": {"every_steps": 2},
            "optimizer": {"lr": 0.01, "weight_decay": 1e-4, "lr_decay_epochs": [30]},
            "logging": {"tensorboard": False, "progress_bar": False}}


def _forget_keys(*prefixes: str) -> Callable[[pytest.MonkeyPatch], None]:
    """A resume that leaves the trainable keys under `prefixes` at their fresh initialisation."""
    def forget(monkeypatch: pytest.MonkeyPatch) -> None:
        def load_some(self: Distiller, state: dict) -> None:
            kept = {k: v for k, v in state["trainable"].items() if not k.startswith(prefixes)}
            self.unwrapped.load_state_dict(kept, strict=False)
            if self.state is not None:
                self.state.load_state_dict(state["method_state"], strict=True)
        monkeypatch.setattr(Distiller, "load_state_dict", load_some)
    return forget


def _forget_method_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume that restores the trainable module but not the method's state (CRD: fresh banks, Z re-estimated)."""
    monkeypatch.setattr(Distiller, "load_state_dict",
                        lambda self, state: self.unwrapped.load_state_dict(state["trainable"], strict=True))


def _forget_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume with empty momentum buffers."""
    monkeypatch.setattr(resume_module, "load_optimizer_state", lambda optimizer, state: None)


def _holds_scaler(state: dict) -> None:
    scaler = state["grad_scaler"]
    assert set(scaler) >= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    assert scaler["_growth_tracker"] > 0 or scaler["scale"] != 2.0**16  # the scaler has run


def _holds_banks(state: dict) -> None:
    banks = state["method_state"]
    assert set(banks) == {"memory_s", "memory_t", "z_s", "z_t"}
    assert banks["memory_s"].shape == banks["memory_t"].shape == (160, 16)
    assert banks["z_s"].item() > 0 and banks["z_t"].item() > 0
    assert state["trainable"]["embed_t.weight"].shape == (16, 64)  # resnet14's pooled vector


def _holds(*prefixes: str) -> Callable[[dict], None]:
    def holds(state: dict) -> None:
        for prefix in prefixes:
            assert any(k.startswith(prefix) for k in state["trainable"]), f"no {prefix}* in the checkpoint"
    return holds


COSINE = {"schedule": "cosine", "warmup_epochs": 0.6, "min_lr": 0.001}
CASES = {
    "kd-global": Case(_ctkd(), _holds("temperature.raw"), _forget_optimizer),
    "kd-instance": Case(_ctkd(temperature={"name": "instance", "hidden_dim": 16}), _holds("temperature.mlp"),
                        _forget_keys("temperature.")),
    "loader-workers": Case(_ctkd(data={"num_workers": 2})),
    "fp16-grad-scaler": Case(_fp16, _holds_scaler,
                             lambda mp: mp.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, s: None),
                             files=("mlp",)),
    "cosine-warmup": Case(_ctkd(optimizer=COSINE), lambda s: None if s["lr_scheduler"] else pytest.fail("no LR state"),
                          lambda mp: mp.setattr(LRMultiplier, "load_state_dict", lambda self, s: None)),
    "crd-banks": Case(_with_method({"name": "crd", "nce_k": 16, "feat_dim": 16}), _holds_banks, _forget_method_state),
    "vid-heads": Case(_with_method({"name": "vid"}), _holds("regressors.", "log_scales."),
                      _forget_keys("regressors.", "log_scales.")),
    "srrl-heads": Case(_with_method({"name": "srrl"}), _holds("connector."), _forget_keys("connector.")),
    # FT's paraphraser trains in a 1-epoch init stage (run epoch 0) and stays frozen after it; the translator trains
    # in distillation: both must come back (mid-stage stops: tests/test_stages.py)
    "ft-stage-heads": Case(_with_method({"name": "ft", "init_epochs": 1}), _holds("paraphraser.", "translator."),
                           _forget_keys("paraphraser.", "translator.")),
    "image-folder": Case(_image_folder, files=("images", "resnet18")),
}
STOPS = {"epoch-end": (2, 0), "mid-epoch": (2, 2)}  # crash before this (epoch, step)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> dict[str, Path]:
    """The files the cases read: the resnet14 teacher, a tiny_mlp teacher, an image folder and a ResNet18 file."""
    root = tmp_path_factory.mktemp("resume_inputs")
    torch.manual_seed(7)
    torch.save({"model": models.build_model("tiny_mlp", num_classes=10).state_dict()}, root / "tiny_mlp.pth")
    torch.manual_seed(1)
    torch.save(models.build_model("ResNet18", num_classes=3).state_dict(), root / "resnet18.pth")
    images = write_image_folder(root / "images", classes=3, per_class=5, val_per_class=2)
    return {"teacher": teacher_file, "mlp": root / "tiny_mlp.pth", "resnet18": root / "resnet18.pth", "images": images}


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Callable[[str], dict]:
    """Each case's uninterrupted run, trained on first use: its fingerprint and its last checkpoint."""
    root, done = tmp_path_factory.mktemp("straight_runs"), {}

    def straight(case: str) -> dict:
        if case not in done:
            run(load(CASES[case].config(root, inputs, case), root, f"{case}.yaml"))
            done[case] = {"fingerprint": fingerprint(root / case),
                          "state": torch.load(root / case / "last.pth", weights_only=True)}
        return done[case]
    return straight


def _crash_and_resume(tmp_path: Path, inputs: dict[str, Path], case: str, crash: tuple[int, int],
                      monkeypatch: pytest.MonkeyPatch, forget: bool = False) -> Steps:
    """Train `case` until the in-process crash before step `crash`, then --resume auto (without its state if
    `forget`) to the end; returns where each session started."""
    cfg = load(CASES[case].config(tmp_path, inputs, "run"), tmp_path)
    with pytest.MonkeyPatch.context() as crashing:
        steps = Steps(crashing, crash)
        with pytest.raises(trainer.RunInterrupted):
            run(cfg)
    if forget:
        CASES[case].forget(monkeypatch)
    steps = Steps(monkeypatch)
    run(cfg, resume="auto")
    return steps


@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical(tmp_path: Path, inputs: dict, straight_runs: Callable, case: str, stop: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights, optimizer, method state, scaler, LR schedule, RNG, metrics and TensorBoard equal the straight run."""
    straight = straight_runs(case)
    CASES[case].holds(straight["state"])
    steps = _crash_and_resume(tmp_path, inputs, case, STOPS[stop], monkeypatch)
    epoch, step = steps.starts[0]
    assert epoch == 2 and (step == 0) == (stop == "epoch-end")  # it resumed where the stop left it
    assert fingerprint(tmp_path / "run") == straight["fingerprint"]


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case.forget is not None])
def test_resume_without_the_state_ends_elsewhere(tmp_path: Path, inputs: dict, straight_runs: Callable, case: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control of each case: the comparison above would catch a resume that drops that state."""
    _crash_and_resume(tmp_path, inputs, case, STOPS["epoch-end"], monkeypatch, forget=True)
    assert fingerprint(tmp_path / "run")["state"] != straight_runs(case)["fingerprint"]["state"]


# -------------------------------------------------------------------------------- mid-epoch, kill -9, 2 processes
@pytest.mark.parametrize("left_out", [None, "rng", "sampler offset", "epoch totals"])
def test_mid_epoch_resume_is_exact_and_each_ingredient_is_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight_in_process: dict, left_out: str | None
) -> None:
    """B1–B3 in process: a crash after 3 steps of epoch 2 (just after its step-3 checkpoint), then --resume auto,
    equals the uninterrupted run (weights, optimizer, RNG, metrics, TensorBoard) and sees the same samples at every
    step. Negative controls: without restoring the RNG (dropout masks), the sampler's offset or the epoch's
    running sums, the same comparison fails."""
    steps = crash_then_resume(tmp_path, monkeypatch, crash=(2, 3))
    if left_out == "rng":
        monkeypatch.setattr(resume_module, "restore_rng_state", lambda state: None)
    elif left_out == "sampler offset":
        set_epoch = EpochBatchSampler.set_epoch
        monkeypatch.setattr(EpochBatchSampler, "set_epoch", lambda self, epoch, start_batch=0: set_epoch(self, epoch))
    elif left_out == "epoch totals":
        monkeypatch.setattr(EpochTotals, "from_state", classmethod(lambda cls, state, device: cls()))
    run(load(dropout_config(tmp_path, "run"), tmp_path), resume="auto")
    assert steps.starts[:3] == [(1, 0), (2, 0), (2, 3)]  # the resumed session started at step 3 of epoch 2
    same = fingerprint(tmp_path / "run") == straight_in_process["fingerprint"]
    if left_out is None:
        assert same and steps.seen == straight_in_process["seen"]
        assert set(steps.seen) == {(e, s) for e in (1, 2, 3) for s in range(5)}
        for epoch in (1, 2, 3):  # each epoch a permutation of the training set: no sample missed or repeated
            seen = sorted(i for s in range(5) for i in steps.seen[(epoch, s)])
            assert seen == list(range(160))
    else:
        assert not same, f"the comparison misses a resume without the {left_out}"
    if left_out == "sampler offset":
        assert steps.seen != straight_in_process["seen"]


@pytest.fixture(scope="module")
def straight_subprocess(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Fingerprints of uninterrupted train.py runs, per data.num_workers."""
    root = tmp_path_factory.mktemp("straight_subprocess")
    prints = {}
    for workers in (0, 2):
        data = dropout_config(root, f"w{workers}", data={"num_workers": workers})
        config = write_yaml(root / f"w{workers}.yaml", data)
        done = _train_py(config)
        assert done.returncode == 0, done.stdout + done.stderr
        prints[workers] = fingerprint(root / f"w{workers}")
    return prints


KILLS = [
    (0, ["step:1:1"]),  # before the first checkpoint: a fresh start
    (0, ["step:2:2"]),  # mid-epoch, a step after the checkpoint at step 1
    (0, ["step:2:3"]),  # mid-epoch, right after the checkpoint at step 3
    (0, ["step:3:0"]),  # at an epoch boundary
    (0, ["eval:2"]),  # inside epoch 2's evaluation
    (0, ["save:ckpt-e0002-s000003.pth:partial"]),  # half the temporary file written
    (0, ["save:ckpt-e0002-s000003.pth:written"]),  # temporary file complete, not renamed
    (0, ["save:ckpt-e0002-s000003.pth:renamed"]),  # renamed, last.pth not yet updated
    (0, ["save:ckpt-e0002-s000005.pth:written"]),  # epoch 2's end: its metrics line is already written
    (0, ["prune:4"]),  # e2 s1 and last.pth in place, older checkpoints not yet deleted
    (0, ["step:1:3", "eval:2"]),  # killed twice (the second process's 2nd evaluation is epoch 2's)
    (2, ["step:2:3"]),
    (2, ["eval:2"]),
]


@pytest.mark.parametrize("workers,kills", KILLS, ids=[f"workers{w}-{'+'.join(k)}" for w, k in KILLS])
def test_kill_9_then_resume_auto_is_bit_identical(
    tmp_path: Path, straight_subprocess: dict, workers: int, kills: list[str]
) -> None:
    """B1/B6 and A1: train.py SIGKILLed at each point, then `--resume auto` until it finishes, ends exactly as the
    uninterrupted run; after every kill each file under a checkpoint name is intact."""
    config = write_yaml(tmp_path / "c.yaml", dropout_config(tmp_path, "run", data={"num_workers": workers}))
    out = tmp_path / "run"
    for number, kill in enumerate(kills):
        killed = _train_py(config, *(["--resume", "auto"] if number else []), kill=kill)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        for path in [*out.glob("ckpt-*.pth"), *out.glob("last.pth"), *out.glob("best.pth")]:
            check_run_checkpoint(path)  # a crash leaves no partial file under a checkpoint's name
    resumed = _train_py(config, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert fingerprint(out) == straight_subprocess[workers]
    assert not list(out.glob(".*.tmp"))  # temporary files of the killed writes are cleaned up
    for steps in tensorboard_scalars(out).values():
        assert [step for step, _ in steps] == [1, 2, 3]  # each epoch exactly once


def test_two_processes_resume_mid_epoch_exactly(tmp_path: Path) -> None:
    """2 gloo ranks with per-rank dropout streams: rank 1 fails after 3 steps of epoch 2; --resume auto on 2
    processes restores each rank's RNG and running sums and ends as the uninterrupted 2-process run."""
    straight = write_yaml(tmp_path / "s.yaml", dropout_config(tmp_path, "straight", distributed={"timeout_s": 30.0}))
    crashed = write_yaml(tmp_path / "c.yaml", dropout_config(tmp_path, "crashed", distributed={"timeout_s": 30.0}))
    _spawn(straight, None, None)
    with pytest.raises(mp.ProcessRaisedException):
        _spawn(crashed, None, (1, 2, 3))
    _spawn(crashed, "auto", None)
    a, b = fingerprint(tmp_path / "straight"), fingerprint(tmp_path / "crashed")
    assert a == b


def _spawn(config: Path, resume: str | None, crash: tuple[int, int, int] | None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(config), resume, crash), nprocs=2, join=True)


def _rank(rank: int, world: int, port: int, config: str, resume: str | None, crash: tuple | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if crash is not None and crash[0] == rank:
        with pytest.MonkeyPatch.context() as monkeypatch:
            Steps(monkeypatch, crash=crash[1:])
            _run_rank(config, resume)
    else:
        _run_rank(config, resume)


def _run_rank(config: str, resume: str | None) -> None:
    clean = False
    try:
        try:
            run(load_config(config), resume=resume)
        except trainer.RunInterrupted as stop:
            raise RuntimeError("injected crash") from stop
        clean = True
    finally:
        shutdown_distributed(clean)


def test_epoch_sums_continue_on_another_number_of_processes() -> None:
    """The running sums of 2 saved ranks, resumed on 1 or 3: rank 0 takes the sums over the saved ranks, the others
    start empty, so the epoch's summary covers every sample once."""
    device = torch.device("cpu")
    saved = []
    for values in ([1.0, 2.0], [5.0, 3.0]):
        totals = EpochTotals()
        for value in values:
            totals.add(2, {"ce": torch.tensor(value)}, torch.tensor([1, 2]), {"tau": torch.tensor([value, value + 1])})
        saved.append(totals.state_dict())
    merged = EpochTotals.from_states(saved, 0, 1, device)
    assert merged.samples == 8 and merged.losses["ce"].item() == 2 * (1 + 2 + 5 + 3)
    assert merged.correct.tolist() == [4, 8]
    tau = merged.stats["tau"]
    assert (tau.total.item(), tau.low.item(), tau.high.item()) == (26.0, 1.0, 6.0)
    assert tau.last.item() == (2.5 + 3.5) / 2 and torch.cat(tau.values).tolist() == [1, 2, 2, 3, 5, 6, 3, 4]
    other = EpochTotals.from_states(saved, 2, 3, device)
    assert other.samples == 0 and other.losses["ce"].item() == 0 and other.stats["tau"].values == []
    assert EpochTotals.from_states(saved, 1, 2, device).state_dict()["losses"]["ce"].item() == 16.0


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
    run_crashing_in_epoch(crashed, 2, monkeypatch)
    after = load(ctkd_config(tmp_path, teacher_file, "crashed", epochs=2,
                             runtime={"channels_last": "on", "fold_teacher_bn": True}), tmp_path, "c.yaml")
    run(after, resume="auto")
    resumed = torch.load(Path(after.output_dir) / "last.pth", weights_only=True)["trainable"]
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed[key], value, rtol=1e-3, atol=1e-5, msg=key)
