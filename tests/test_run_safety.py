"""Run safety: one writer per run directory, an unusable output directory, unreadable training images, loader
workers and the SLURM script under stop signals, determinism and per-rank random streams."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from imagefolder import write_image_folder

import ctkd.fileio
import ctkd.integrity
import ctkd.locks
import ctkd.trainer
from conftest import REPO_ROOT, tiny_run_config, write_yaml
from ctkd.config import load_config
from ctkd.datasets import build_dataset, build_loader
from ctkd.datasets.crops import crop_draws
from ctkd.datasets.folder import ImageDecodeError
from ctkd.datasets.transforms import normalize
from ctkd.distributed import DistributedContext, init_distributed, seed_rank, shutdown_distributed
from ctkd.integrity import verify_checksum
from ctkd.locks import (
    LOCK_FD_ENV,
    MIN_FREE_BYTES,
    OutputDirError,
    RunLockedError,
    is_locked,
    lock_holder,
    lock_run,
    try_lock_run,
)
from ctkd.logging import get_logger
from ctkd.system import seed_everything
from ctkd.trainer import run

TINY = {"epochs": 1, "data": {"train_size": 64, "test_size": 20}, "logging": {"tensorboard": False}}


def tiny_config(tmp_path: Path, name: str = "run", **sections: dict) -> Path:
    """A one-epoch vanilla run on 64 synthetic images (a few seconds)."""
    data = tiny_run_config(tmp_path, name, **TINY)
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return write_yaml(tmp_path / f"{name}.yaml", data)


@pytest.fixture
def messages() -> list[str]:
    """What the ctkd logger says during the test."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = get_logger()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _train_py(*args: str, env: dict | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)


# --------------------------------------------------------------------------------------- one writer per directory
def test_second_run_into_a_locked_directory_stops_before_any_work(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path))
    holder = lock_run(cfg.output_dir)  # another open file description: flock conflicts as with another process
    try:
        started = time.monotonic()
        with pytest.raises(RunLockedError) as info:
            run(cfg)
        assert time.monotonic() - started < 10
        message = str(info.value)
        assert f"output_dir {cfg.output_dir} is in use" in message
        assert f"pid {os.getpid()} on {socket.gethostname()} since " in message
        assert sorted(p.name for p in Path(cfg.output_dir).iterdir()) == [".lock"]  # nothing written
    finally:
        holder.release()


@pytest.mark.slow
def test_train_py_refuses_a_locked_directory_with_status_1(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    holder = lock_run(tmp_path / "run")
    try:
        done = _train_py("--config", str(config))
    finally:
        holder.release()
    assert done.returncode == 1, done.stdout + done.stderr
    line = f"error: output_dir {tmp_path / 'run'} is in use: another run holds its lock (pid {os.getpid()} on "
    assert line in done.stdout + done.stderr


def test_a_dead_holders_lock_is_taken_over_and_reported(tmp_path: Path, messages: list[str]) -> None:
    cfg = load_config(tiny_config(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ctkd.locks import lock_run; lock_run(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(600)", cfg.output_dir],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert is_locked(cfg.output_dir) and lock_holder(cfg.output_dir).startswith(f"pid {holder.pid} on ")
    finally:
        holder.kill()  # SIGKILL: no clean release, the lock file keeps naming it
        holder.wait()
    left = lock_holder(cfg.output_dir)
    assert not is_locked(cfg.output_dir) and left.startswith(f"pid {holder.pid} on {socket.gethostname()} since ")
    results = run(cfg)  # the leftover .lock does not block
    assert results["epochs"] == 1
    takeover = [m for m in messages if m.startswith("took over the lock of")]
    assert takeover == [f"took over the lock of {cfg.output_dir}: its previous holder ({left}) is no longer running"]
    assert (Path(cfg.output_dir) / ".lock").read_text() == "" and not is_locked(cfg.output_dir)  # a clean end


@pytest.mark.slow
def test_a_lock_passed_by_the_parent_is_adopted_not_refused(tmp_path: Path) -> None:
    """scripts/reproduce.py holds the run's lock and passes it to train.py, which adopts it."""
    config = tiny_config(tmp_path)
    lock = try_lock_run(tmp_path / "run")
    try:
        done = _train_py("--config", str(config), env={LOCK_FD_ENV: str(lock.fd)}, pass_fds=(lock.fd,))
        assert done.returncode == 0, done.stdout + done.stderr
        assert is_locked(tmp_path / "run")  # still ours: the child's end does not release the parent's lock
    finally:
        lock.release()
    assert not is_locked(tmp_path / "run")


def test_a_lock_fd_of_another_directory_is_not_adopted(tmp_path: Path) -> None:
    other = try_lock_run(tmp_path / "other")
    try:
        os.environ[LOCK_FD_ENV] = str(other.fd)
        assert ctkd.locks.adopt_run_lock(tmp_path / "run") is None
        assert os.environ[LOCK_FD_ENV] == str(other.fd)
    finally:
        os.environ.pop(LOCK_FD_ENV, None)
        other.release()


@pytest.mark.slow
def test_students_started_together_wait_for_the_teacher_being_trained(tmp_path: Path, teacher_file: Path,
                                                                      messages: list[str], monkeypatch) -> None:
    """The second student finds the teacher's run directory locked, waits, then uses the file the first wrote."""
    teacher_cfg = tiny_config(tmp_path, "teacher", student={"name": "resnet14"})
    wanted = tmp_path / "teacher" / "best.pth"
    student = tiny_config(tmp_path, "student", method="kd",
                          teacher={"name": "resnet14", "checkpoint": str(wanted), "train_config": str(teacher_cfg)})
    monkeypatch.setattr("ctkd.distributed.WAIT_POLL_S", 0.1)
    first = lock_run(tmp_path / "teacher")  # the other student's teacher run

    def finish_teacher() -> None:
        deadline = time.monotonic() + 60.0  # finish once the student says it waits (however slow the machine)
        while not any(m.startswith("waiting for teacher checkpoint") for m in messages) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.copy(teacher_file, wanted)
        first.release()

    worker = threading.Thread(target=finish_teacher)
    worker.start()
    try:
        results = run(load_config(student))
    finally:
        worker.join()
    assert results["epochs"] == 1 and results["teacher"] == "resnet14"
    assert any(m.startswith(f"waiting for teacher checkpoint {wanted}: {tmp_path / 'teacher'} is locked by pid ")
               for m in messages), messages
    assert f"teacher checkpoint {wanted} was written by the run that held it: using it" in messages
    assert not (tmp_path / "teacher" / "metrics.jsonl").exists()  # not trained a second time


# ------------------------------------------------------------------------------------------------ output directory
@pytest.mark.parametrize("case", ["file_in_place", "file_as_parent"])
def test_output_dir_that_cannot_be_a_directory_is_refused(tmp_path: Path, case: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    output = blocker if case == "file_in_place" else blocker / "run"
    cfg = load_config(tiny_config(tmp_path, output_dir=str(output)))
    with pytest.raises(OutputDirError) as info:
        run(cfg)
    what = "it is a file" if case == "file_in_place" else f"{blocker} is a file"
    assert str(info.value) == (f"output_dir {output} cannot be used: {what}, not a directory. Fix that, or choose "
                               "another output_dir (output_dir=...)")


def test_read_only_output_dir_is_refused(tmp_path: Path, monkeypatch) -> None:
    """The directory exists but no file can be created in it (a read-only mount, another user's folder); simulated,
    since the suite may run as root, which writes into read-only folders."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    output = tmp_path / "run"
    output.mkdir()
    monkeypatch.setattr(ctkd.locks.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputDirError, match=f"output_dir {output} cannot be used: no file can be created in it"):
        run(load_config(tiny_config(tmp_path)))


def test_read_only_parent_is_refused(tmp_path: Path, monkeypatch) -> None:
    """As a non-root user would see it (the suite may run as root, which writes anywhere)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    cfg = load_config(tiny_config(tmp_path, output_dir=str(tmp_path / "locked" / "run")))
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputDirError, match=r"cannot be created \(Permission denied; the nearest existing folder is"):
        run(cfg)


Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_is_refused_before_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ctkd.locks.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(OutputDirError, match=r"its filesystem has 1 MiB free, less than the 64 MiB this run needs"):
        run(load_config(tiny_config(tmp_path)))


def test_room_for_the_checkpoints_is_checked_once_the_model_is_known(tmp_path: Path, monkeypatch) -> None:
    free = MIN_FREE_BYTES + 2**10  # enough for the logs, not for the resnet8 checkpoints
    monkeypatch.setattr(ctkd.locks.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30, free))
    with pytest.raises(OutputDirError, match=r"less than the 6\d MiB .*\(4 checkpoint files at once, of about"):
        run(load_config(tiny_config(tmp_path)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first epoch


def _checkpoint_bytes_held(folder: Path) -> int:
    """How many checkpoints' worth of bytes `folder` holds: its distinct checkpoint files (hard links to one file
    count once), the temporary file of one being written included."""
    inodes = {p.stat().st_ino for p in folder.iterdir()
              if p.name.endswith(".pth") or (".pth." in p.name and p.name.endswith(".tmp"))}
    return len(inodes)


def _watch_the_budget(monkeypatch) -> tuple[list, list]:
    """Record the budget the trainer checks, and the most checkpoint files held at once during the run."""
    budgets, peak = [], [0]
    real_check, real_write = ctkd.locks.check_free_space, ctkd.fileio.atomic_write

    def check(directory, size, files):
        budgets.append((size, files))
        real_check(directory, size, files)

    def counting_write(path, write):
        def write_and_count(handle):
            write(handle)
            peak[0] = max(peak[0], _checkpoint_bytes_held(Path(path).parent))
        return real_write(path, write_and_count)

    monkeypatch.setattr(ctkd.trainer, "check_free_space", check)
    monkeypatch.setattr(ctkd.integrity, "atomic_write", counting_write)
    monkeypatch.setattr(ctkd.fileio, "atomic_write", counting_write)
    return budgets, peak


@pytest.mark.parametrize("keep_last", [2, 5])
def test_the_disk_budget_is_what_the_retention_settings_hold_at_their_peak(
    tmp_path: Path, monkeypatch, keep_last: int
) -> None:
    """last.pth and best.pth are hard links to series files: a run holds keep_last series files and the new one,
    plus best.pth's file once pruned from the series; the budget counts those, each of the estimated size."""
    budgets, peak = _watch_the_budget(monkeypatch)
    run(load_config(tiny_config(tmp_path, epochs=keep_last + 2, checkpoint={"keep_last": keep_last})))
    [(size, files)] = budgets
    assert files == keep_last + 2 and keep_last + 1 <= peak[0] <= files
    run_dir = tmp_path / "run"
    newest = sorted(run_dir.glob("ckpt-*.pth"))[-1]
    assert os.path.samefile(run_dir / "last.pth", newest)  # no second copy
    saved = max(p.stat().st_size for p in run_dir.glob("ckpt-*.pth"))
    assert 0.8 * saved < size <= saved  # the estimate is a checkpoint's tensors (the file adds small metadata)


def test_without_hard_links_last_and_best_are_copies_and_the_budget_says_so(tmp_path: Path, monkeypatch) -> None:
    """On a filesystem without hard links the run copies, as before, and its budget counts the copies: keep_last
    series files and the new one, last.pth and its temporary copy, best.pth."""
    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(ctkd.fileio.os, "link", no_links)
    budgets, peak = _watch_the_budget(monkeypatch)
    run(load_config(tiny_config(tmp_path, epochs=4, checkpoint={"keep_last": 2})))
    [(_, files)] = budgets
    assert files == 2 + 4 == peak[0]
    run_dir = tmp_path / "run"
    assert not os.path.samefile(run_dir / "last.pth", sorted(run_dir.glob("ckpt-*.pth"))[-1])
    assert verify_checksum(run_dir / "last.pth") and verify_checksum(run_dir / "best.pth")


def test_best_pth_outlives_its_pruned_series_file_intact(tmp_path: Path) -> None:
    """best.pth links to the best epoch's series file; when pruning deletes that name, the bytes stay, verified."""
    from ctkd.series import CheckpointSeries, Position

    writer = CheckpointSeries(tmp_path, keep_last=2, warn=print)
    writer.save({"epoch": 1, "value": torch.arange(3)}, Position(1, 5), best=True)
    for epoch in (2, 3, 4):
        writer.save({"epoch": epoch, "value": torch.arange(3) * epoch}, Position(epoch, 5))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pth")) == ["ckpt-e0003-s000005.pth", "ckpt-e0004-s000005.pth"]
    assert verify_checksum(tmp_path / "best.pth")
    assert torch.load(tmp_path / "best.pth", weights_only=True)["epoch"] == 1
    assert os.path.samefile(tmp_path / "last.pth", tmp_path / "ckpt-e0004-s000005.pth")


# ------------------------------------------------------------------------------------------- unreadable images
SMALL = {"num_classes": 3, "image_size": 32, "resize_size": 36}


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "imagenet", classes=3, per_class=4)


def _batches(loader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)
    iterator = iter(loader)
    try:
        return list(iterator)
    finally:
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_training_image_is_replaced_by_the_next_of_its_class_and_counted(tree: Path, workers: int) -> None:
    source = build_dataset("imagenet", root=str(tree), train=True, max_bad_images=1, **SMALL)
    bad = 5  # class 1 holds samples 4..7: its replacement is sample 6
    _truncate(source.path(bad))
    batches = _batches(build_loader(source, batch_size=4, train=True, seed=0, num_workers=workers), epoch=2)
    images, indices = torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches])
    row = int((indices == bad).nonzero())
    uniforms, flips = crop_draws(0, 2, torch.tensor([bad]))
    expected = normalize(source._transform(source.load_image(6), uniforms[0], bool(flips[0]))[None], source.mean,
                         source.std)
    assert torch.equal(images[row], expected[0])
    assert torch.cat([b.targets for b in batches])[row] == 1  # the label of the sample, and of its replacement
    assert source.bad_images(2) == 1 and source.bad_images(1) == 0  # seen by this process, workers or not


@pytest.mark.parametrize("epoch", [-1, 0])
def test_bad_images_of_initialisation_stage_epochs_are_counted(tree: Path, epoch: int) -> None:
    """Stage epochs are run epochs ≤ 0: a file first found unreadable in one is recorded and counted there."""
    source = build_dataset("imagenet", root=str(tree), train=True, max_bad_images=1, **SMALL)
    _truncate(source.path(5))
    _batches(build_loader(source, batch_size=4, train=True, seed=0, num_workers=0), epoch=epoch)
    assert source.bad_images(epoch) == 1 and source.bad_record() == {5: epoch + 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_more_bad_images_than_the_budget_stop_naming_the_files(tree: Path, workers: int) -> None:
    source = build_dataset("imagenet", root=str(tree), train=True, max_bad_images=1, **SMALL)
    for index in (1, 9):
        _truncate(source.path(index))
    loader = build_loader(source, batch_size=12, train=True, seed=0, num_workers=workers)
    with pytest.raises(ImageDecodeError) as info:
        _batches(loader, epoch=0)
    message = str(info.value)
    assert message.startswith("2 training image files cannot be read, more than data.max_bad_images = 1 allows: ")
    assert source.path(1) in message and source.path(9) in message and "\n" not in message


def test_test_images_are_never_replaced(tree: Path) -> None:
    source = build_dataset("imagenet", root=str(tree), train=False, max_bad_images=5, **SMALL)
    _truncate(source.path(0))
    with pytest.raises(ImageDecodeError, match="sample 0 "):
        source.load_batch(torch.tensor([0]), epoch=0, train=False, seed=0)


def test_bad_images_reach_the_epoch_metrics(tree: Path, tmp_path: Path) -> None:
    source = build_dataset("imagenet", root=str(tree), train=True, **SMALL)
    _truncate(source.path(3))
    data = tiny_run_config(tmp_path, **TINY)
    data["data"] = {"name": "imagenet", "root": str(tree), "batch_size": 4, "num_workers": 0, "max_bad_images": 1,
                    **SMALL}
    run(load_config(write_yaml(tmp_path / "folder.yaml", data)))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["bad_images"] == 1


def _budget_run(rank: int, world: int, port: int, config: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        run(load_config(config))
        result = "finished"
    except ImageDecodeError as err:
        result = str(err)
    finally:
        shutdown_distributed(False)
    Path(out, f"rank{rank}.txt").write_text(result)


@pytest.mark.slow
def test_the_bad_image_budget_is_for_all_processes_together(tree: Path, tmp_path: Path) -> None:
    """data.max_bad_images 1 and two unreadable files, one in each rank's share of epoch 1: each rank alone meets
    one (within the budget), together they meet two, so both ranks stop naming both files."""
    source = build_dataset("imagenet", root=str(tree), train=True, **SMALL)
    shares = []
    for rank in range(2):
        loader = build_loader(source, batch_size=4, train=True, seed=0, num_workers=0, rank=rank, world_size=2)
        shares.append([int(i) for b in _batches(loader, epoch=1) for i in b.indices])
    first = shares[0][0]
    second = next(i for i in shares[1] if source.targets[i] != source.targets[first])  # another class
    for index in (first, second):
        _truncate(source.path(index))
    data = tiny_run_config(tmp_path, **TINY)
    data["data"] = {"name": "imagenet", "root": str(tree), "batch_size": 4, "num_workers": 0, "max_bad_images": 1,
                    **SMALL}
    data["distributed"] = {"timeout_s": 30.0}
    config = write_yaml(tmp_path / "folder.yaml", data)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_budget_run, args=(2, port, str(config), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("2 training image files cannot be read (over all processes), more than "
                                  "data.max_bad_images = 1 allows: "), message
        assert source.path(first) in message and source.path(second) in message
    assert not list((tmp_path / "run").glob("*.pth"))  # stopped before the epoch's checkpoint


# ------------------------------------------------------------------------------------------------ stop signals
@pytest.mark.slow
def test_loader_workers_ignore_the_stop_signals(tmp_path: Path) -> None:
    source = build_dataset("synthetic", root=str(tmp_path), train=True, num_classes=4, train_size=48, test_size=8)
    loader = build_loader(source, batch_size=8, train=True, seed=0, num_workers=2, persistent_workers=True)
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    try:
        next(iterator), next(iterator)  # batches 0 and 1 come from workers 0 and 1: both ran their worker_init_fn
        workers = list(iterator._workers)
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            for worker in workers:
                os.kill(worker.pid, signum)
        time.sleep(1.0)
        assert all(worker.is_alive() for worker in workers)
        assert len([next(iterator) for _ in range(4)]) == 4  # the rest of the epoch
        loader.sampler.set_epoch(2)
        assert len(list(loader)) == 6 and all(worker.is_alive() for worker in workers)  # persistent, still serving
    finally:
        iterator._shutdown_workers()


def _fake_slurm(tmp_path: Path, step_exit: int) -> Path:
    """srun and scontrol stand-ins: the step records its arguments and, on SIGUSR1 or SIGTERM, exits `step_exit`
    (torchrun exits 1 after passing a signal on); scontrol records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    step = (
        "import signal, sys, time, pathlib\n"
        "log = pathlib.Path(sys.argv[1])\n"
        "def stop(signum, frame):\n"
        "    log.write_text(log.read_text() + f'signal {signum}\\n'); sys.exit(int(sys.argv[2]))\n"
        "signal.signal(signal.SIGUSR1, stop); signal.signal(signal.SIGTERM, stop)\n"
        "log.write_text('args ' + ' '.join(sys.argv[3:]) + '\\n')\n"
        "time.sleep(60)\n"
    )
    (tmp_path / "step.py").write_text(step)
    (bin_dir / "srun").write_text(
        f'#!/usr/bin/env bash\nexec {sys.executable} {tmp_path / "step.py"} {tmp_path / "step.log"} {step_exit} "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> {tmp_path / "scontrol.log"}; '
        "fi\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def _sbatch(tmp_path: Path, env: dict, signum: int | None, step_exit: int = 1, *args: str) -> tuple[int, str]:
    bin_dir = _fake_slurm(tmp_path, step_exit)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
                "SLURM_NNODES": "1", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPO_ROOT), **env}
    script = subprocess.Popen(["bash", "scripts/slurm_train.sbatch", "--config", "cfg.yaml", *args], cwd=REPO_ROOT,
                              env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "step.log"
    deadline = time.monotonic() + 20
    while not (log.exists() and log.read_text()) and script.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the script's traps are set right after the step starts
    if signum is not None and script.poll() is None:
        script.send_signal(signum)
    output = script.communicate(timeout=30)[0]
    return script.returncode, output


def test_slurm_script_requeues_after_the_time_limit_signal(tmp_path: Path) -> None:
    code, output = _sbatch(tmp_path, {}, signal.SIGUSR1)
    assert code == 1, output
    step_log = (tmp_path / "step.log").read_text()
    assert "-m torch.distributed.run" in step_log
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in step_log
    assert step_log.splitlines()[0].endswith("train.py --config cfg.yaml")
    assert f"signal {int(signal.SIGUSR1)}" in step_log  # passed on to the step
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"
    assert "requeueing job 42" in output


def test_slurm_script_does_not_requeue_after_sigterm(tmp_path: Path) -> None:
    code, output = _sbatch(tmp_path, {}, signal.SIGTERM)
    assert code == 1 and f"signal {int(signal.SIGTERM)}" in (tmp_path / "step.log").read_text(), output
    assert not (tmp_path / "scontrol.log").exists()


def test_slurm_script_requeues_an_array_task_and_a_requeued_job_resumes(tmp_path: Path) -> None:
    env = {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "1"}
    code, output = _sbatch(tmp_path, env, signal.SIGUSR1, 130)
    assert code == 130, output
    assert (tmp_path / "scontrol.log").read_text() == "requeue 7_3\n"
    assert (tmp_path / "step.log").read_text().splitlines()[0].endswith("train.py --config cfg.yaml --resume auto")


def test_slurm_script_refuses_an_invalid_job_id(tmp_path: Path) -> None:
    code, output = _sbatch(tmp_path, {"SLURM_JOB_ID": "42; rm -rf"}, None)
    assert code == 1 and "invalid SLURM job id" in output
    assert not (tmp_path / "step.log").exists()


# ------------------------------------------------------------------------------------------------ determinism
def _rank_masks(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", 30.0)
    try:
        seed_everything(0)
        init = torch.rand(4)  # what initialisation draws: alike on every rank
        seed_rank(0, ctx)
        mask = torch.nn.functional.dropout(torch.ones(64), 0.5) > 0
        gathered = [torch.zeros(4) for _ in range(world)], [torch.zeros(64, dtype=torch.bool) for _ in range(world)]
        dist.all_gather(gathered[0], init)
        dist.all_gather(gathered[1], mask)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        shutdown_distributed(True)


@pytest.mark.slow
def test_two_ranks_draw_different_dropout_masks_after_alike_initialisation(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "masks.pt")
    mp.spawn(_rank_masks, args=(2, port, out), nprocs=2, join=True)
    inits, masks = torch.load(out)
    assert torch.equal(inits[0], inits[1])
    assert not torch.equal(masks[0], masks[1])


def test_a_single_process_keeps_the_stream_of_its_seed() -> None:
    seed_everything(5)
    expected = torch.rand(8)
    seed_everything(5)
    seed_rank(5, DistributedContext())
    assert torch.equal(torch.rand(8), expected)


def test_deterministic_runs_on_cpu_and_sets_cublas_workspace(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        first = run(load_config(tiny_config(tmp_path, "a", runtime={"deterministic": True})))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        second = run(load_config(tiny_config(tmp_path, "b")))
        assert not torch.are_deterministic_algorithms_enabled()  # switched off again by a run without it
    finally:
        torch.use_deterministic_algorithms(False)
    assert first["last_acc1"] == second["last_acc1"]
    records = [json.loads((tmp_path / name / "metrics.jsonl").read_text()) for name in "ab"]
    for record in records:
        del record["epoch_time"]
    assert records[0] == records[1]  # CPU: bit-exact with or without the option
