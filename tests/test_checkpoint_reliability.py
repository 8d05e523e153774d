"""Checkpoint reliability (README: Command line, Outputs): verified files, fallback to the previous intact checkpoint,
retention, exact resume from any step after `kill -9`, negative controls, the teacher file's hash, old formats."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import fault_hooks
import pytest
import torch
import torch.multiprocessing as mp

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_dropout_mlp: dropout makes the RNG state matter)
import train as train_cli
from conftest import REPO_ROOT, load, tiny_run_config, write_yaml
from ctkd import resume as resume_module
from ctkd import series, trainer
from ctkd.checkpoint import load_run_checkpoint
from ctkd.config import ConfigError, load_config
from ctkd.datasets.loader import EpochBatchSampler
from ctkd.distributed import shutdown_distributed
from ctkd.integrity import CheckpointError, atomic_save, load_file, stored_checksum
from ctkd.logging import get_logger
from ctkd.provenance import file_sha256
from ctkd.series import CheckpointSeries, check_run_checkpoint
from ctkd.totals import EpochTotals
from ctkd.trainer import run

V2_FIXTURE = REPO_ROOT / "tests" / "data" / "v2_last.pth"
REAL_BATCHES = trainer.Trainer.batches
DAMAGE = ("half", "empty", "flip")


# ------------------------------------------------------------------------------------------------ helpers
def dropout_config(root: Path, name: str, **sections: Any) -> dict:
    """3 epochs × 5 steps of tiny_dropout_mlp; a checkpoint every 2 steps (and at epoch ends), the newest 2 kept.

    Checkpoints: e1 s2, s4, s5 (end) · e2 s1, s3, s5 (end) · e3 s2, s4, s5 (end).
    """
    config = tiny_run_config(root, name, student={"name": "tiny_dropout_mlp"},
                             logging={"tensorboard": True, "progress_bar": False})
    config["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


def fingerprint(run_dir: Path) -> dict[str, Any]:
    """What must equal the uninterrupted run's: a SHA-256 over the final weights, optimizer state and RNG states,
    the progress, the metrics and every TensorBoard scalar as (step, value) pairs (times aside)."""
    state = torch.load(run_dir / "last.pth", weights_only=True, map_location="cpu")
    digest = hashlib.sha256()
    for key, value in state["trainable"].items():
        digest.update(key.encode() + value.contiguous().numpy().tobytes())
    for index, param_state in sorted(state["optimizer"]["state"].items()):
        for key, value in sorted(param_state.items()):
            if isinstance(value, torch.Tensor):
                digest.update(f"{index}.{key}".encode() + value.contiguous().numpy().tobytes())
    rng = state["rng"]
    digest.update(rng["torch"].numpy().tobytes() + rng["numpy"]["keys"].numpy().tobytes())
    digest.update(repr((rng["python"]["state"], rng["numpy"]["pos"])).encode())
    if "cuda" in rng:
        digest.update(rng["cuda"].numpy().tobytes())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        row.pop("epoch_time")
    return {
        "state": digest.hexdigest(), "epoch": state["epoch"], "best": (state["best_acc1"], state["best_epoch"]),
        "metrics": metrics,
        "scalars": {tag: steps for tag, steps in tensorboard_scalars(run_dir).items() if tag != "time/epoch_s"},
    }


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) pairs as TensorBoard shows them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def files(run_dir: Path) -> dict[str, bytes]:
    """The run directory's files and their bytes (not the hidden lock file, which each start rewrites)."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".pth") or ".pth." in p.name)


class Steps:
    """Wraps Trainer.batches: records the sample indices of every (epoch, step) and where each session started, and
    raises KeyboardInterrupt (an in-process crash) before step `crash` = (epoch, step) if set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, crash: tuple[int, int] | None = None) -> None:
        self.seen: dict[tuple[int, int], list[int]] = {}
        self.starts: list[tuple[int, int]] = []
        self.crash = crash
        monkeypatch.setattr(trainer.Trainer, "batches", lambda owner, epoch_run: self(owner, epoch_run))

    def __call__(self, owner: trainer.Trainer, epoch_run):  # noqa: ANN001, ANN204
        epoch, start = epoch_run.epoch, epoch_run.start_step
        self.starts.append((epoch, start))
        return self._batches(REAL_BATCHES(owner, epoch_run), epoch, start)

    def _batches(self, loader, epoch: int, start: int):  # noqa: ANN001, ANN202
        for step, batch in enumerate(loader, start=start):
            if self.crash == (epoch, step):
                self.crash = None
                raise KeyboardInterrupt(f"simulated crash before step {step} of epoch {epoch}")
            self.seen[(epoch, step)] = batch.indices.tolist()
            yield batch


class Messages(logging.Handler):
    """Collects the project logger's messages (it does not propagate to pytest's caplog once the CLI ran)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def messages():
    handler, logger = Messages(), get_logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def damage(path: Path, kind: str) -> None:
    """Truncate `path` to half, empty it, or flip one bit in the middle of its bytes (tensor data)."""
    data = bytearray(path.read_bytes())
    if kind == "half":
        data = data[: len(data) // 2]
    elif kind == "empty":
        data = bytearray()
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def straight_in_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run in this process: its fingerprint and the indices of every step."""
    root = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as monkeypatch:
        steps = Steps(monkeypatch)
        run(load(dropout_config(root, "run"), root))
    return {"fingerprint": fingerprint(root / "run"), "seen": steps.seen}


def crash_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: tuple[int, int]) -> Steps:
    """Run until the in-process crash before step `crash`, then `--resume auto` (the caller may patch in between)."""
    cfg = load(dropout_config(tmp_path, "run"), tmp_path)
    steps = Steps(monkeypatch, crash)
    with pytest.raises(trainer.RunInterrupted):
        run(cfg)
    return steps


# ------------------------------------------------------------------------------------------------ verified files
@pytest.mark.parametrize("kind", DAMAGE)
def test_loading_verifies_the_checksum(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "state.pth"
    atomic_save({"weights": torch.linspace(0, 1, 4096), "epoch": 3}, path)
    assert stored_checksum(path) is not None and torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["state.pth"]  # no temporary file left
    damage(path, kind)
    if kind == "flip":  # what the checksum is for: torch.load alone reads the flipped byte silently
        assert not torch.equal(torch.load(path, weights_only=True)["weights"], torch.linspace(0, 1, 4096))
    reason = {"half": "truncated", "empty": "truncated", "flip": "checksum mismatch"}[kind]
    with pytest.raises(CheckpointError, match=reason) as info:
        load_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", DAMAGE)
def test_auto_resume_sets_a_damaged_newest_checkpoint_aside_and_uses_the_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[str], straight_in_process: dict, kind: str
) -> None:
    """A2/A3: the newest checkpoint (epoch 3, step 2) truncated, emptied or bit-flipped: it is renamed aside (bytes
    kept), a warning names it and the reason, and the run continues from epoch 2's end exactly."""
    crash_then_resume(tmp_path, monkeypatch, crash=(3, 3))
    out = tmp_path / "run"
    newest = out / "ckpt-e0003-s000002.pth"
    assert checkpoint_names(out) == ["best.pth", "ckpt-e0002-s000005.pth", newest.name, "last.pth"]
    damage(newest, kind)
    damaged = newest.read_bytes()
    messages.clear()
    run(load(dropout_config(tmp_path, "run"), tmp_path), resume="auto")
    aside = [p for p in out.iterdir() if p.name.startswith(newest.name + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # set aside, never deleted
    reason = {"half": "truncated", "empty": "truncated", "flip": "checksum mismatch"}[kind]
    warning = next(line for line in messages if "set aside" in line)
    assert str(newest) in warning and reason in warning and aside[0].name in warning
    assert any(f"resumed from {out / 'ckpt-e0002-s000005.pth'} after epoch 2" in line for line in messages)
    assert fingerprint(out) == straight_in_process["fingerprint"]


@pytest.mark.parametrize("problem", ["truncated", "flipped", "missing", "directory", "foreign"])
def test_explicit_resume_of_a_bad_checkpoint_is_an_error(
    tmp_path: Path, problem: str, capsys: pytest.CaptureFixture
) -> None:
    """A4: --resume PATH with a damaged, missing or non-checkpoint file fails before training, naming the file and
    why; nothing in the run directory changes (no fresh start, nothing set aside)."""
    config = write_yaml(tmp_path / "c.yaml", dropout_config(tmp_path, "run", epochs=1))
    assert train_cli.main(["--config", str(config)]) == 0
    out = tmp_path / "run"
    path = {"missing": out / "nope.pth", "directory": out}.get(problem, out / "last.pth")
    if problem in ("truncated", "flipped"):
        damage(path, {"truncated": "half", "flipped": "flip"}[problem])
    elif problem == "foreign":
        torch.save({"model": models.build_model("tiny_dropout_mlp").state_dict()}, path)
    before = files(out)
    capsys.readouterr()
    assert train_cli.main(["--config", str(config), "epochs=2", "--resume", str(path)]) == 1
    message = capsys.readouterr().out
    reason = {"truncated": "truncated", "flipped": "checksum mismatch", "missing": "no such checkpoint file",
              "directory": "no such checkpoint file", "foreign": "not a ctkd run checkpoint"}[problem]
    assert str(path) in message and reason in message
    assert files(out) == before


# ------------------------------------------------------------------------------------------------ retention
def test_keep_last_keeps_the_newest_and_never_the_resumed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[str]
) -> None:
    """A5: keep_last 3 with a checkpoint every step: after each save exactly the newest 3 (plus last.pth, a copy of
    the newest, and best.pth); a failed delete is logged and done at a later save; a run resumed from an older
    checkpoint keeps that one, and sets the newer ones aside."""
    listings = []
    real_save = CheckpointSeries.save

    def save(self, state, position, **kwargs):  # noqa: ANN001, ANN202
        path = real_save(self, state, position, **kwargs)
        listings.append(([p.name for _, p in series.series(self.directory)], path.name))
        assert (self.directory / "last.pth").read_bytes() == path.read_bytes()
        return path

    real_unlink, refused = Path.unlink, []

    def unlink(self, missing_ok=False):  # noqa: ANN001, ANN202 - the first delete of e1 s2 fails
        if self.name == "ckpt-e0001-s000002.pth" and not refused:
            refused.append(self)
            raise PermissionError("read-only file system")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(CheckpointSeries, "save", save)
    monkeypatch.setattr(Path, "unlink", unlink)
    cfg = load(dropout_config(tmp_path, "run", epochs=2, checkpoint={"every_steps": 1, "keep_last": 3}), tmp_path)
    run(cfg)
    saved = [name for _, name in listings]
    assert len(saved) == 10 and saved[-1] == "ckpt-e0002-s000005.pth"
    for number, (listing, _) in enumerate(listings):
        expected = saved[max(0, number - 2): number + 1]
        if number == 4:  # e1 s2's delete failed: it waits for the next save
            expected = ["ckpt-e0001-s000002.pth", *expected]
        assert listing == expected, number
    assert any("could not delete old checkpoint file" in line and "ckpt-e0001-s000002.pth" in line
               for line in messages)
    out = Path(cfg.output_dir)
    assert checkpoint_names(out) == ["best.pth", *saved[-3:], "last.pth"]

    older = out / "ckpt-e0002-s000003.pth"
    longer = load(dropout_config(tmp_path, "run", epochs=3, checkpoint={"every_steps": 1, "keep_last": 2}),
                  tmp_path, "longer.yaml")
    run(longer, resume=str(older))
    names = checkpoint_names(out)
    assert older.name in names  # the checkpoint resumed from is never pruned
    assert [n for n in names if n.startswith("ckpt-") and n.endswith(".pth")] == [
        older.name, "ckpt-e0003-s000004.pth", "ckpt-e0003-s000005.pth"]
    assert sum(n.startswith("ckpt-e0002-s000004.pth.superseded-") for n in names) == 1
    assert sum(n.startswith("ckpt-e0002-s000005.pth.superseded-") for n in names) == 1


def test_keeping_fewer_than_two_checkpoints_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last' is 1, but at least 2 .* resume from"):
        load(dropout_config(tmp_path, "run", checkpoint={"keep_last": 1}), tmp_path)


# ------------------------------------------------------------------------------------------------ exact resume
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


def _train_py(config: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """train.py in a subprocess, with a kill point of tests/fault_hooks.py if `kill` is given."""
    env = fault_hooks.subprocess_env(kill)
    command = [sys.executable, "-c", "import fault_hooks; fault_hooks.main()", "--config", str(config), *args]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


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


@pytest.mark.slow
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


# ------------------------------------------------------------------------------------------------ teacher file
def test_teacher_file_is_identified_by_its_content(tmp_path: Path) -> None:
    """Item 5: the checkpoint records the teacher file's SHA-256; the same file moved elsewhere resumes, a file
    with other content is refused."""
    torch.manual_seed(1)
    first = tmp_path / "a" / "teacher.pth"
    first.parent.mkdir()
    torch.save({"model": models.build_model("tiny_mlp", num_classes=10).state_dict()}, first)

    def config(teacher: Path, epochs: int) -> Any:
        data = dropout_config(tmp_path, "kd", epochs=epochs, method="kd", temperature={"name": "fixed"},
                              teacher={"name": "tiny_mlp", "checkpoint": str(teacher)})
        return load(data, tmp_path, f"kd{epochs}.yaml")

    run(config(first, 1))
    saved = torch.load(tmp_path / "kd" / "last.pth", weights_only=True)
    assert saved["teacher_sha256"] == file_sha256(first)
    moved = tmp_path / "b" / "renamed.pth"
    moved.parent.mkdir()
    shutil.move(first, moved)
    assert run(config(moved, 2), resume="auto")["epochs"] == 2
    torch.manual_seed(2)
    other = tmp_path / "c" / "teacher.pth"
    other.parent.mkdir()
    torch.save({"model": models.build_model("tiny_mlp", num_classes=10).state_dict()}, other)
    with pytest.raises(CheckpointError, match=r"teacher file .*teacher\.pth .* is not the one this run was trained"):
        run(config(other, 3), resume="auto")


# ------------------------------------------------------------------------------------------------ formats
def test_version_2_checkpoint_still_loads_and_resumes(tmp_path: Path) -> None:
    """A7: tests/data/v2_last.pth (one epoch of tiny_dropout_mlp written before checksums and mid-epoch state)
    loads with weights_only, resumes with --resume auto, and continues as an uninterrupted run."""
    raw = torch.load(V2_FIXTURE, weights_only=True)
    assert raw["version"] == 2 and raw["epoch"] == 1 and stored_checksum(V2_FIXTURE) is None
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(V2_FIXTURE, old / "last.pth")
    sections = {"student": {"name": "tiny_dropout_mlp"}, "logging": {"tensorboard": False, "progress_bar": False}}
    run(load(tiny_run_config(tmp_path, "old", epochs=2, **sections), tmp_path, "old.yaml"), resume="auto")
    run(load(tiny_run_config(tmp_path, "new", epochs=2, **sections), tmp_path, "new.yaml"))
    a, b = (torch.load(tmp_path / name / "last.pth", weights_only=True) for name in ("old", "new"))
    assert a["version"] == 3 and a["epoch"] == 2
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in b["trainable"])
    assert (old / "ckpt-e0001-s000005.pth").read_bytes() == V2_FIXTURE.read_bytes()  # kept in the series


def test_unknown_version_and_missing_checksum_are_refused(tmp_path: Path) -> None:
    state = load_run_checkpoint(V2_FIXTURE)
    atomic_save({**state, "version": 4}, tmp_path / "v4.pth")
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint version 4 \(supported: 1, 2, 3\)"):
        load_run_checkpoint(tmp_path / "v4.pth")
    torch.save(state, tmp_path / "unchecked.pth")  # version 3 written without the checksum
    with pytest.raises(CheckpointError, match="unchecked.pth is truncated or corrupted: its SHA-256 checksum is"):
        load_run_checkpoint(tmp_path / "unchecked.pth")
