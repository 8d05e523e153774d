"""Initialisation stages in the trainer (ctkd.stages): they run before distillation epoch 1 on their own SGD and
data epochs, are visible in metrics.jsonl and TensorBoard, and a run stopped inside or between them resumes to the
uninterrupted run's end bit for bit (in the style of test_resume.py's matrix, with negative controls; 2 processes).

The probe method: KD with two stages on tiny_dropout_mlp (dropout: the RNG matters), "warm" (2 epochs: the whole
student on the MSE of its pooled vector to the teacher's, SGD 0.05) and "head" (1 epoch: only ``student.fc``, on
CE, SGD 0.1 with momentum 0.5 and no weight decay), then 2 distillation epochs of 5 steps; run epochs −2, −1, 0, 1, 2.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from resume_tools import Steps, fingerprint, tensorboard_scalars
from torch import Tensor

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_dropout_mlp)
from conftest import ctkd_config, load, write_yaml
from ctkd import resume as resume_module
from ctkd import stages as stages_module
from ctkd import trainer
from ctkd.config import load_config
from ctkd.datasets.loader import EpochBatchSampler
from ctkd.distributed import shutdown_distributed
from ctkd.guard import NonFiniteLossError
from ctkd.methods import METHODS, Method, Stage
from ctkd.methods.base import StepInputs
from ctkd.options import MethodOptions, spec
from ctkd.series import Position, series, state_position
from ctkd.stages import StagePlan, stage_line, stage_parameters
from ctkd.trainer import run


class StageProbe(Method):
    """KD with the two stages of the module docstring; `nan_at` = (stage, its epoch, step) poisons that step."""

    paper = "a test probe"
    nan_at: tuple[str, int, int] | None = None

    @dataclass(frozen=True)
    class Options(MethodOptions):
        name: str = "stage_probe"
        warm_epochs: int = spec(2, ge=0)
        head_epochs: int = spec(1, ge=0)

    def stages(self) -> list[Stage]:
        return [Stage("warm", self.options.warm_epochs, ("student",), 0.05),
                Stage("head", self.options.head_epochs, ("student.fc",), 0.1, momentum=0.5, weight_decay=0.0)]

    def stage_loss_terms(self, stage: Stage, step: StepInputs) -> dict[str, Tensor]:
        if stage.name == "warm":
            terms = {"loss_match": F.mse_loss(step.student_features[-1], step.teacher.features[-1])}
        else:
            terms = {"loss_head": F.cross_entropy(step.logits, step.batch.targets)}
        if self.nan_at == (stage.name, step.ctx.epoch, step.ctx.step):
            terms = {name: value * float("nan") for name, value in terms.items()}
        return terms


def _register() -> None:
    """Register the probe (idempotent: spawned ranks call it too)."""
    if "stage_probe" not in METHODS:
        METHODS.register("stage_probe")(StageProbe)


@pytest.fixture(scope="module", autouse=True)
def probe_method() -> Iterator[None]:
    """The probe is registered for this module only (`python -m ctkd list methods` must not see it elsewhere)."""
    _register()
    yield
    METHODS._builders.pop("stage_probe", None)


@pytest.fixture(scope="module")
def probe_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe_teacher") / "tiny_dropout_mlp.pth"
    torch.manual_seed(7)
    torch.save({"model": models.build_model("tiny_dropout_mlp", num_classes=10).state_dict()}, path)
    return path


def probe_config(root: Path, teacher: Path, name: str, **sections: Any) -> dict:
    """2 distillation epochs of 5 steps after the probe's 3 stage epochs; a checkpoint every 2 steps, all kept."""
    data = ctkd_config(root, teacher, name, epochs=2, student={"name": "tiny_dropout_mlp"},
                       teacher={"name": "tiny_dropout_mlp", "checkpoint": str(teacher)},
                       method={"name": "stage_probe"}, checkpoint={"every_steps": 2, "keep_last": 50}, **sections)
    data["logging"]["tensorboard"] = True
    return data


def probe_fingerprint(run_dir: Path) -> dict[str, Any]:
    """resume_tools.fingerprint without the stages' epoch times either."""
    found = fingerprint(run_dir)
    found["scalars"] = {tag: steps for tag, steps in found["scalars"].items() if not tag.endswith("/epoch_s")}
    return found


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, probe_teacher: Path) -> dict[str, Any]:
    """The uninterrupted probe run: its directory, fingerprint and the sample indices of every (epoch, step)."""
    root = tmp_path_factory.mktemp("straight_stages")
    with pytest.MonkeyPatch.context() as monkeypatch:
        steps = Steps(monkeypatch)
        run(load(probe_config(root, probe_teacher, "run"), root))
    return {"dir": root / "run", "fingerprint": probe_fingerprint(root / "run"), "seen": steps.seen}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir: Path, epoch: int, step: int = 5) -> dict[str, Any]:
    return torch.load(run_dir / Position(epoch, step).name, weights_only=True)


# ------------------------------------------------------------------------------------------------ units
def test_stage_epochs_are_numbered_before_distillation_and_checkpoints_sort_first(tmp_path: Path) -> None:
    plan = StagePlan([Stage("a", 2, ("student",), 0.1), Stage("b", 3, ("student",), 0.1)])
    assert plan.total == 5 and [plan.run_epoch(g) for g in range(5)] == [-4, -3, -2, -1, 0]
    assert [plan.locate(g)[::2] for g in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert plan.next_run_epoch(0) == -4 and plan.where(Position(-2, 5), False, 5) == "after epoch 1 of stage b"
    assert plan.where(Position(-3, 2), True, 5) == "inside epoch 2 of stage a, after step 2 of 5"
    plan.done = 5
    assert plan.next_run_epoch(3) == 4 and plan.where(Position(1, 2), True, 5) is None
    names = [Position(e, 3).name for e in (-12, -1, 0, 1)]
    assert names == ["ckpt-e-0012-s000003.pth", "ckpt-e-0001-s000003.pth", "ckpt-e0000-s000003.pth",
                     "ckpt-e0001-s000003.pth"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for _, p in series(tmp_path)] == names  # oldest first: the stages before distillation
    state = {"epoch": 0, "epoch_state": None, "stages": {"done": 2, "total": 5}}
    assert state_position(state, 5) == Position(-3, 5)
    assert state_position({**state, "stages": None}, 5) == Position(0, 5)


def test_stage_declarations_are_checked() -> None:
    for bad in ({"name": "a/b"}, {"epochs": -1}, {"lr": 0.0}, {"trains": ()}):
        with pytest.raises(ValueError, match="stage"):
            Stage(**{"name": "a", "epochs": 1, "trains": ("student",), "lr": 0.1, **bad})
    method = _probe_method()
    assert stage_parameters(method, Stage("x", 1, ("student.fc",), 0.1)) == list(method.student.fc.parameters())
    with pytest.raises(ValueError, match="trains 'nowhere', which is no submodule"):
        stage_parameters(method, Stage("x", 1, ("nowhere",), 0.1))


def _probe_method() -> StageProbe:
    from ctkd.config import LossConfig
    from ctkd.methods import MethodSetup
    from ctkd.temperatures import FixedTemperature

    setup = MethodSetup([], [], 10, torch.zeros(0, dtype=torch.long), seed=0)
    return StageProbe(models.build_model("tiny_dropout_mlp", num_classes=10), FixedTemperature(4.0),
                      options=StageProbe.Options(), loss=LossConfig(), setup=setup)


# ------------------------------------------------------------------------------------------------ a run with stages
@pytest.mark.slow
def test_stages_train_before_distillation_on_their_own_data_epochs(straight: dict) -> None:
    """Stage epochs −2, −1, 0 see the loader's orders of data epochs −2, −1, 0 (a pure function of seed and run
    epoch), the distillation epochs those of epochs 1, 2: as a run without stages, and never a stage's."""
    seen = straight["seen"]
    assert sorted({epoch for epoch, _ in seen}) == [-2, -1, 0, 1, 2]
    sampler = EpochBatchSampler(160, 32, seed=0, shuffle=True)
    for epoch in (-2, -1, 0, 1, 2):
        sampler.set_epoch(epoch)
        order = sampler.order().tolist()
        assert [i for step in range(5) for i in seen[(epoch, step)]] == order


@pytest.mark.slow
def test_only_the_stage_modules_move_and_distillation_starts_as_without_stages(straight: dict) -> None:
    run_dir = straight["dir"]
    start, warm, head = _checkpoint(run_dir, -2, 1), _checkpoint(run_dir, -1), _checkpoint(run_dir, 0)
    changed = {key for key in head["trainable"] if not torch.equal(warm["trainable"][key], head["trainable"][key])}
    assert changed == {"student.fc.weight", "student.fc.bias"}  # stage "head" trains student.fc alone
    assert not torch.equal(start["trainable"]["student.hidden.weight"], warm["trainable"]["student.hidden.weight"])
    for state in (start, warm, head):  # τ is in no stage; the distillation SGD has not stepped: zero momentum
        assert torch.equal(state["trainable"]["temperature.raw"], start["trainable"]["temperature.raw"])
        buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
        assert buffers and all(not b.any() for b in buffers)
    assert head["stages"]["done"] == 3 and head["stages"]["name"] == "head"
    assert head["stages"]["optimizer"]["param_groups"][0]["momentum"] == 0.5  # the stage's own SGD
    records = _records(run_dir)
    # the step schedule (milestone 2: epochs after it ×0.1) counts from distillation epoch 1, not the run's first
    assert [r["lr"] for r in records] == [0.05, 0.05, 0.1, 0.05, 0.05]
    assert [r.get("lambda") for r in records[3:]] == [0.5, 1.0]  # the cosine curriculum too (loops 2)


@pytest.mark.slow
def test_stage_epochs_are_visible_in_metrics_tensorboard_and_the_console(straight: dict) -> None:
    run_dir = straight["dir"]
    records = _records(run_dir)
    stage_keys = [(r["epoch"], r.get("stage"), r.get("stage_epoch")) for r in records]
    assert stage_keys == [(-2, "warm", 1), (-1, "warm", 2), (0, "head", 1), (1, None, None), (2, None, None)]
    assert all(math.isfinite(r["train_loss_match"]) for r in records[:2]) and "train_loss_head" in records[2]
    assert "train_acc1" not in records[0] and "test_acc1" not in records[0]  # no evaluation in a stage
    scalars = tensorboard_scalars(run_dir)
    assert [step for step, _ in scalars["stage/warm/loss_match"]] == [-2, -1]
    assert [step for step, _ in scalars["stage/head/loss_head"]] == [0]
    assert [step for step, _ in scalars["stage/head/lr"]] == [0]
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert stage_line(records[1]).startswith("stage warm epoch 2/2 (run epoch -1) lr 0.05 loss ")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2 and results["stage_epochs"] == {"warm": 2, "head": 1}


# ------------------------------------------------------------------------------------------------ resume
STOPS = {  # crash before this (run epoch, step); what the newest checkpoint then holds
    "mid-stage": (-2, 2),  # inside warm's first epoch, after its step-1 checkpoint
    "stage-epoch-end": (-1, 0),  # between warm's two epochs: its momentum carries over
    "between-stages": (0, 0),  # warm done, head not started: head starts with a fresh SGD
    "mid-second-stage": (0, 3),  # inside head, right after its step-3 checkpoint
    "after-stages": (1, 1),  # the stages' end checkpoint: distillation starts from scratch
    "mid-distillation": (2, 2),
}
RESUMED_AT = {"mid-stage": (-2, 1), "stage-epoch-end": (-1, 0), "between-stages": (0, 0), "mid-second-stage": (0, 3),
              "after-stages": (1, 0), "mid-distillation": (2, 1)}


def _crash_and_resume(root: Path, teacher: Path, crash: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> Steps:
    cfg = load(probe_config(root, teacher, "run"), root)
    with pytest.MonkeyPatch.context() as crashing:
        Steps(crashing, crash)
        with pytest.raises(trainer.RunInterrupted):
            run(cfg)
    steps = Steps(monkeypatch)
    run(cfg, resume="auto")
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("stop", list(STOPS))
def test_a_run_stopped_in_or_between_stages_resumes_bit_identically(
    tmp_path: Path, probe_teacher: Path, straight: dict, stop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _crash_and_resume(tmp_path, probe_teacher, STOPS[stop], monkeypatch)
    assert steps.starts[0] == RESUMED_AT[stop]
    assert probe_fingerprint(tmp_path / "run") == straight["fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("left_out, stop", [("stage optimizer", "stage-epoch-end"),
                                            ("stage progress", "between-stages")])
def test_a_resume_without_the_stage_state_ends_elsewhere(
    tmp_path: Path, probe_teacher: Path, straight: dict, left_out: str, stop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative controls: the comparison above catches a resume that drops the stage's momentum buffers or how
    many stage epochs were done (the stages then train again)."""
    if left_out == "stage optimizer":
        monkeypatch.setattr(stages_module, "load_optimizer_state", lambda optimizer, state: None)
    else:
        monkeypatch.setattr(resume_module, "_restore_stages", lambda state, plan, path: None)
    _crash_and_resume(tmp_path, probe_teacher, STOPS[stop], monkeypatch)
    assert probe_fingerprint(tmp_path / "run")["state"] != straight["fingerprint"]["state"]


@pytest.mark.slow
def test_a_non_finite_stage_step_stops_the_run_without_checkpointing_it(
    tmp_path: Path, probe_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StageProbe, "nan_at", ("warm", 2, 2))  # the third step of warm's second epoch (run −1)
    cfg = load(probe_config(tmp_path, probe_teacher, "run"), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"step 3 of epoch -1 .*stage warm 2/2"):
        run(cfg)
    newest, _ = series(tmp_path / "run")[-1]
    assert newest == Position(-1, 2) and (tmp_path / "run" / "FAILED").is_file()


# ------------------------------------------------------------------------------------------------ 2 processes
@pytest.mark.slow
def test_two_processes_resume_mid_stage_exactly(tmp_path: Path, probe_teacher: Path) -> None:
    """2 gloo ranks (per-rank dropout streams, the stage's own DDP wrapper): after the stages both ranks hold the
    same weights (the stage's gradients were averaged); rank 1 fails after 3 steps of stage warm's first epoch, and
    --resume auto on 2 processes ends as the uninterrupted 2-process run."""
    timeout = {"distributed": {"timeout_s": 30.0}}
    straight = write_yaml(tmp_path / "s.yaml", probe_config(tmp_path, probe_teacher, "straight", **timeout))
    crashed = write_yaml(tmp_path / "c.yaml", probe_config(tmp_path, probe_teacher, "crashed", **timeout))
    _spawn(straight, None, None, tmp_path)
    digests = {(tmp_path / f"rank{rank}.sha").read_text() for rank in range(2)}
    assert len(digests) == 1
    with pytest.raises(mp.ProcessRaisedException):
        _spawn(crashed, None, (1, -2, 3))
    _spawn(crashed, "auto", None)
    assert probe_fingerprint(tmp_path / "straight") == probe_fingerprint(tmp_path / "crashed")


def _spawn(config: Path, resume: str | None, crash: tuple[int, int, int] | None, record: Path | None = None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(config), resume, crash, record), nprocs=2, join=True)


def _record_after_stages(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Write a SHA-256 of this rank's trainable state to `path` once the stages are done."""
    real = trainer.train_stages

    def recording(owner: trainer.Trainer, inside: dict | None) -> dict | None:
        left = real(owner, inside)
        digest = hashlib.sha256()
        for key, value in owner.exp.distiller.unwrapped.state_dict().items():
            digest.update(key.encode() + value.contiguous().numpy().tobytes())
        path.write_text(digest.hexdigest())
        return left
    monkeypatch.setattr(trainer, "train_stages", recording)


def _rank(rank: int, world: int, port: int, config: str, resume: str | None, crash: tuple | None,
          record: Path | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    _register()
    with pytest.MonkeyPatch.context() as monkeypatch:
        if crash is not None and crash[0] == rank:
            Steps(monkeypatch, crash=crash[1:])
        if record is not None:
            _record_after_stages(monkeypatch, record / f"rank{rank}.sha")
        clean = False
        try:
            try:
                run(load_config(config), resume=resume)
            except trainer.RunInterrupted as stop:
                raise RuntimeError("injected crash") from stop
            clean = True
        finally:
            shutdown_distributed(clean)


def test_a_stop_in_a_stage_names_the_run_epoch_as_a_stage_epoch() -> None:
    from ctkd.preemption import StopRequested

    assert str(StopRequested(2, 4, "SIGTERM")) == "stopped by SIGTERM after step 4 of epoch 2"
    assert "after step 3 of run epoch -1 (an initialisation stage" in str(StopRequested(-1, 3, "SIGTERM"))
