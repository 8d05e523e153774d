"""Kill points for the crash tests: SIGKILL at a chosen point of a train.py run (test code; production has no hooks).

A test runs train.py in a subprocess with tests/ on PYTHONPATH and CTKD_TEST_KILL set::

    python -c "import fault_hooks; fault_hooks.main()" --config FILE [--resume auto] [KEY=VALUE ...]

`main` installs the kill point (monkeypatching functions of ctkd.trainer, ctkd.integrity and ctkd.series by wrapping
them), then runs train.py as `python train.py` would. CTKD_TEST_KILL is one of

- ``step:E:S``: before step S (0-based) of epoch E, i.e. once S steps of it are done (after a checkpoint there);
- ``eval:N``: inside the process's N-th evaluation of the student (epoch N's from a fresh start), after its first
  batch;
- ``save:NAME:PHASE``: while checkpoint file NAME (a glob, e.g. ``ckpt-e0002-s000003.pth``) is written: PHASE
  ``partial`` (half its bytes in the temporary file), ``written`` (the temporary file complete and fsynced, not
  renamed), ``renamed`` (in place under its name; last.pth not yet updated);
- ``prune:N``: at the N-th pruning of the process's checkpoint series (after its N-th save: the new checkpoint and
  last.pth in place, older ones not yet deleted);
- ``fail:RANK:EPOCH:raise|kill``: rank RANK raises (or SIGKILLs itself) as epoch EPOCH starts (a crashed rank);
- ``signal:E:S:NAME[:RANK]``: not a kill: the process sends itself signal NAME (SIGTERM, SIGUSR1, SIGINT) before
  step S of epoch E, as a scheduler or Ctrl-C would (only on rank RANK under torchrun, when given);
- ``job:E:S:NAME[:RANK]``: the same, sent to torchrun (the parent) and every one of its workers at once, as a
  scheduler signals every process of a job (torchrun then forwards its copy to each worker);
- ``slow_save:NAME:SECONDS[:RANK[:AGAIN]]``: not a kill: writing checkpoint file NAME (a glob) takes SECONDS longer;
  with AGAIN, the process sends itself SIGTERM AGAIN seconds into that write (a late second stop request).

Several specs can be combined, separated by commas (e.g. a signal and a slowed write).

Importing this module also registers the test models (tests/tiny_models.py) in the process.
"""
from __future__ import annotations

import fnmatch
import os
import runpy
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tiny_models  # noqa: F401  (registers tiny_dropout_mlp in the child process)
from ctkd import integrity, series, trainer

ENV = "CTKD_TEST_KILL"
REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(kill: str | None = None) -> dict[str, str]:
    """The environment of a launched training process: tests/ and the repository importable, one OpenMP thread (on a
    shared 2-core machine threads spin against other processes: 3x slower) and the kill point `kill`, if any."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if kill:
        env[ENV] = kill
    return env


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _killing_before(batches: Iterable[Any], index: int, action: Any = None) -> Iterator[Any]:
    """`batches`, dying (or doing `action`) when batch number `index` (0-based) of this iteration would be fetched."""
    action = action or _die
    position = 0
    for batch in batches:
        if position == index:
            action()
        yield batch
        position += 1
    if position == index:  # a kill point after the epoch's last step
        action()


def _kill_at_step(epoch: int, step: int, action: Any = None) -> None:
    real = trainer.Trainer.batches

    def batches(self, run):  # noqa: ANN001, ANN202
        loader = real(self, run)
        if run.epoch == epoch:
            loader = _killing_before(loader, step - run.start_step, action)
        return loader

    trainer.Trainer.batches = batches


def _signal_at_step(epoch: int, step: int, name: str, rank: str | None, group: bool = False) -> None:
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    if group:
        _kill_at_step(epoch, step, lambda: _signal_job(getattr(signal, name)))
    else:
        _kill_at_step(epoch, step, lambda: os.kill(os.getpid(), getattr(signal, name)))


def _signal_job(sig: signal.Signals) -> None:
    """Send `sig` to the parent (torchrun) and to every process it started, in one go."""
    parent = os.getppid()
    workers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                workers.append(int(proc.name))
    for pid in [parent, *workers]:
        os.kill(pid, sig)


def _slow_save(pattern: str, seconds: float, rank: str | None, again: float | None) -> None:
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    real = integrity.atomic_write

    def atomic_write(path, write):  # noqa: ANN001, ANN202
        if fnmatch.fnmatch(Path(path).name, pattern):
            def slow_write(handle) -> None:  # noqa: ANN001
                if again is not None:
                    threading.Timer(again, os.kill, (os.getpid(), signal.SIGTERM)).start()
                time.sleep(seconds)
                write(handle)
            return real(path, slow_write)
        return real(path, write)

    integrity.atomic_write = atomic_write


def _kill_in_evaluation(number: int) -> None:
    real = trainer.evaluate
    calls = 0

    def evaluate(model, loader, *args, **kwargs):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += 1
        if calls == number:
            loader = _killing_before(loader, 1)
        return real(model, loader, *args, **kwargs)

    trainer.evaluate = evaluate


def _kill_in_save(pattern: str, phase: str) -> None:
    real = integrity.atomic_write

    def atomic_write(path, write):  # noqa: ANN001, ANN202
        if not fnmatch.fnmatch(Path(path).name, pattern):
            return real(path, write)

        def write_then_die(handle) -> None:  # noqa: ANN001
            write(handle)
            handle.flush()
            if phase == "partial":
                handle.truncate(handle.seek(0, os.SEEK_END) // 2)
            os.fsync(handle.fileno())
            _die()

        if phase == "renamed":
            real(path, write)
            _die()
        return real(path, write_then_die)

    integrity.atomic_write = atomic_write


def _kill_in_prune(number: int) -> None:
    real = series.CheckpointSeries.prune
    calls = 0

    def prune(self) -> None:  # noqa: ANN001
        nonlocal calls
        calls += 1
        if calls == number:
            _die()
        real(self)

    series.CheckpointSeries.prune = prune


def _fail_at_epoch(rank: int, epoch: int, how: str, spec: str) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    real = trainer.Trainer.run_epoch

    def run_epoch(self, number, *args, **kwargs):  # noqa: ANN001, ANN202
        if number == epoch:
            if how == "kill":
                _die()
            raise RuntimeError(f"fault injected by {ENV}={spec}")
        return real(self, number, *args, **kwargs)

    trainer.Trainer.run_epoch = run_epoch


def install(specs: str) -> None:
    """Install the kill points of `specs` (comma-separated; see the module docstring)."""
    for spec in specs.split(","):
        _install(spec)


def _install(spec: str) -> None:
    """Install one kill point."""
    kind, *args = spec.split(":")
    if kind == "step":
        _kill_at_step(int(args[0]), int(args[1]))
    elif kind == "eval":
        _kill_in_evaluation(int(args[0]))
    elif kind == "save":
        _kill_in_save(args[0], args[1])
    elif kind == "prune":
        _kill_in_prune(int(args[0]))
    elif kind == "fail":
        _fail_at_epoch(int(args[0]), int(args[1]), args[2], spec)
    elif kind in ("signal", "job"):
        _signal_at_step(int(args[0]), int(args[1]), args[2], args[3] if len(args) > 3 else None, kind == "job")
    elif kind == "slow_save":
        _slow_save(args[0], float(args[1]), args[2] if len(args) > 2 else None,
                   float(args[3]) if len(args) > 3 else None)
    else:
        raise ValueError(f"{ENV}={spec}: unknown kill point")


def main() -> None:
    """Install the kill point of $CTKD_TEST_KILL (if set), then run train.py with this process's arguments."""
    if os.environ.get(ENV):
        install(os.environ[ENV])
    runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":  # torchrun -m fault_hooks --config ... (each rank installs the hook itself)
    main()
