"""Run directories: reading finished and unfinished runs (config.yaml, metrics.jsonl, results.json) for reports and
plots, and keeping one writer per directory (its lock, and checks that it is writable and has room).

Only json, yaml and the standard library are used here, so the report scripts start quickly and never import torch.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ctkd.config import experiment_differences
from ctkd.errors import UserError

T = TypeVar("T")

RUN_MARKERS = ("config.yaml", "metrics.jsonl")  # train.py writes config.yaml first, then one metrics line per epoch


class RunFileError(UserError, ValueError):
    """A file of a run directory that exists but cannot be read or parsed."""


@dataclass(frozen=True)
class RunSummary:
    """One run's state and headline numbers, as the run summary table shows them."""

    name: str  # path of the run directory relative to the searched folder
    path: Path
    method: str | None = None
    teacher: str | None = None  # None for runs without a teacher (vanilla)
    student: str | None = None
    temperature: str | None = None  # None for runs without a teacher (vanilla)
    seed: int | None = None
    best_acc1: float | None = None
    best_epoch: int | None = None
    last_acc1: float | None = None
    final_tau: float | None = None  # tau_last of the last finished epoch
    epochs_done: int = 0
    epochs_planned: int | None = None
    status: str = "not started"

    @property
    def models(self) -> str:
        """'teacher → student', or just the student for runs without a teacher."""
        student = self.student or "?"
        return f"{self.teacher} → {student}" if self.teacher else student


def is_run_dir(path: Path) -> bool:
    """Whether `path` looks like a run directory written by train.py."""
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_runs(root: str | Path) -> list[Path]:
    """Run directories at or below `root`, sorted by their path relative to `root`."""
    root = Path(root)
    found = [Path(folder) for folder, _, files in os.walk(root) if any(m in files for m in RUN_MARKERS)]
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def _read_text(path: Path) -> str:
    """The file's text; an unreadable file (permissions, bad encoding) becomes a RunFileError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RunFileError(f"cannot read {path.name}: {err}") from err


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of `metrics.jsonl` ([] when absent).

    A last line that is not valid JSON was cut short by a crash mid-append and is ignored (train.py drops it too on
    resume); a damaged line elsewhere raises RunFileError.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RunFileError(f"metrics.jsonl line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunFileError(f"metrics.jsonl line {number} is not an epoch record")
        records.append(record)
    return records


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The contents of `results.json`, or None when the run has not finished (no file)."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        return None
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise RunFileError(f"results.json is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunFileError("results.json is not a JSON object")
    return data


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config in `config.yaml` as a plain dict (not re-validated: old runs may predate a schema change)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunFileError("config.yaml is missing")
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise RunFileError(f"config.yaml is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunFileError("config.yaml is not a mapping")
    return data


def config_value(config: Mapping[str, Any], dotted_key: str) -> Any:
    """The value at a dotted key such as 'teacher.name', or None when any part is missing."""
    value: Any = config
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _method_name(config: Mapping[str, Any]) -> str | None:
    """The method's name: `method.name`, or `method` itself in configs written before methods had options."""
    method = config.get("method")
    return config_value(config, "method.name") if isinstance(method, Mapping) else method


def _number(value: Any) -> float | None:
    """`value` as a float when it is a number (JSON null and junk become None)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _best(records: list[dict[str, Any]]) -> tuple[float | None, int | None]:
    """Best test top-1 over the records and its first epoch (the trainer keeps the first of equal bests)."""
    scored = [(acc, record["epoch"]) for record in records if (acc := _number(record.get("test_acc1"))) is not None]
    if not scored:
        return None, None
    best = max(acc for acc, _ in scored)
    return best, next(epoch for acc, epoch in scored if acc == best)


# ------------------------------------------------------------------------------------------------ the state of a run
RUN_STATES = ("done", "running", "interrupted", "failed", "not started")
FAILED_FILE = "FAILED"  # written when a run ends in an error: its exit status, the reason, the command


@dataclass(frozen=True)
class RunStatus:
    """What a run directory holds, read from its files alone: its state, why (a failure's reason, the lock's holder,
    a damaged file) and, when compared with a plan, the experiment keys in which it differs from it."""

    state: str  # one of RUN_STATES
    detail: str = ""
    epochs_done: int = 0
    epochs_planned: int | None = None  # what its own config.yaml plans
    differences: tuple[tuple[str, Any, Any], ...] = ()  # (key, this run's value, the plan's)

    @property
    def matches_plan(self) -> bool:
        """Whether the run is the experiment it was compared with (no difference outside the placement keys)."""
        return not self.differences

    def describe(self, plan_name: str = "the table") -> str:
        """'done', 'failed: <reason>', or 'done with epochs=1, data.name=synthetic; <plan_name> plans 240, cifar100'."""
        text = self.state
        if self.differences:
            ours = ", ".join(f"{key}={_shown(value)}" for key, value, _ in self.differences)
            theirs = ", ".join(f"{key}={_shown(value)}" for key, _, value in self.differences)
            text = f"{text} with {ours}; {plan_name} plans {theirs}"
        return f"{text}: {self.detail}" if self.detail else text


def _shown(value: Any) -> str:
    """A config value as YAML spells it, for status lines."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _has_checkpoint(path: Path) -> bool:
    """Whether the run left a checkpoint to continue from (the series or, from earlier versions, last.pth)."""
    return (path / "last.pth").is_file() or any(path.glob("ckpt-e*-s*.pth"))


def _failure_reason(path: Path) -> str:
    """The reason recorded in the run's FAILED marker (its second line), or its first when there is no other."""
    try:
        lines = [line for line in (path / FAILED_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return "(FAILED marker unreadable)"
    return lines[1] if len(lines) > 1 else (lines[0] if lines else "(no reason recorded)")


def inspect_run(run_dir: str | Path, plan: Mapping[str, Any] | None = None) -> RunStatus:
    """The state of the run in `run_dir` from what the directory holds (config.yaml, results.json, metrics.jsonl,
    checkpoints, its lock and FAILED marker), never from how it was started; with `plan` (a config as nested plain
    dicts), also how the run differs from that experiment."""
    path = Path(run_dir)
    problems: list[str] = []
    config = _attempt(read_config, path, {}, problems) if (path / "config.yaml").exists() else {}
    records = _attempt(read_metrics, path, [], problems)
    results = _attempt(read_results, path, None, problems)
    epochs = config_value(config, "epochs")
    planned = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None
    done_epochs = records[-1]["epoch"] if records else 0
    differences = tuple(experiment_differences(config, plan)) if plan is not None and config else ()
    if results is not None and planned is not None and results.get("epochs") == planned:
        state, detail = "done", ""  # a results.json of an earlier, shorter run resumed for more epochs is not
    elif is_locked(path):
        state, detail = "running", lock_holder(path)
    elif (path / FAILED_FILE).is_file():
        state, detail = "failed", _failure_reason(path)
    elif _has_checkpoint(path) or records:
        state, detail = "interrupted", ""
    else:
        state, detail = "not started", ""
    if problems and state != "running":
        detail = "; ".join([*problems, *([detail] if detail else [])])
        if state == "done":
            state = "interrupted"  # its records cannot be trusted to say it finished
    return RunStatus(state, detail, done_epochs, planned, differences)


def _attempt(read: Callable[[Path], T], path: Path, default: T, problems: list[str]) -> T:
    """`read(path)`, or `default` with the reason appended to `problems` when the file is damaged."""
    try:
        return read(path)
    except RunFileError as err:
        problems.append(str(err))
        return default


def summarize_run(run_dir: str | Path, root: str | Path | None = None) -> RunSummary:
    """Summarise one run directory; never raises for a damaged run (its status says 'unreadable: <reason>')."""
    path = Path(run_dir)
    if root is not None and path.resolve() != Path(root).resolve():
        name = path.relative_to(root).as_posix()
    else:
        name = path.resolve().name
    problems: list[str] = []
    # each file is read on its own, so one damaged file still leaves the others' numbers in the table
    config = _attempt(read_config, path, {}, problems)
    records = _attempt(read_metrics, path, [], problems)
    results = _attempt(read_results, path, None, problems)
    planned = config_value(config, "epochs")
    planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else None
    found = inspect_run(path)
    status = found.describe() if found.state in ("failed", "running") else found.state
    if found.state == "done" and results is not None:
        best_acc1, best_epoch = _number(results.get("best_acc1")), results.get("best_epoch")
    else:
        best_acc1, best_epoch = _best(records)
    # validated configs only set teacher.* for methods that distil, so teacher.name tells whether τ means anything
    teacher = config_value(config, "teacher.name")
    seed = config_value(config, "seed")
    last = records[-1] if records else {}
    return RunSummary(
        name=name,
        path=path,
        method=_method_name(config),
        teacher=teacher,
        student=config_value(config, "student.name"),
        temperature=config_value(config, "temperature.name") if teacher else None,
        seed=seed if isinstance(seed, int) else None,
        best_acc1=best_acc1,
        best_epoch=best_epoch if isinstance(best_epoch, int) else None,
        last_acc1=_number(last.get("test_acc1")),
        final_tau=_number(last.get("tau_last")),
        epochs_done=last.get("epoch", 0),
        epochs_planned=planned,
        status=f"unreadable: {'; '.join(problems)}" if problems else status,
    )


def summarize_runs(root: str | Path) -> list[RunSummary]:
    """Summaries of every run directory at or below `root`, sorted by path."""
    return [summarize_run(path, root) for path in find_runs(root)]


# ----------------------------------------------------------------------------------------- one writer per run directory
# A run directory has one writer at a time: whoever trains in it holds an exclusive flock on <run_dir>/.lock for the
# run's life (train.py's rank 0, or scripts/reproduce.py on behalf of the train.py it starts). The kernel drops a
# flock when its holder dies, so a .lock file left by a killed run never blocks the next one; the file only says who
# holds (or last held) the lock: "pid N on HOST since YYYY-MM-DD HH:MM:SS". A holder that ends normally empties it.
LOCK_FILE = ".lock"
# The fd of a lock on the run directory that a parent process holds and passed on (scripts/reproduce.py does, with
# subprocess's pass_fds): train.py then adopts that lock instead of taking a second one, which would conflict with it.
LOCK_FD_ENV = "CTKD_RUN_LOCK_FD"
LOCK_ATTEMPTS = 3  # a `reproduce.py --status` elsewhere probes the lock for an instant: do not take that for a holder
# errno values of a filesystem without flock (e.g. Lustre mounted without -o flock): the run goes on, unprotected
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
MIN_FREE_BYTES = 64 * 2**20  # free space an output_dir needs besides its checkpoints (logs, metrics, TensorBoard)
_HOLDER_RE = re.compile(r"^pid (\d+) on (\S+)")


class OutputDirError(UserError, OSError):
    """The output directory cannot be created or written, or its filesystem is (nearly) full."""


class RunLockedError(UserError, RuntimeError):
    """Another live process holds the run directory's lock (it is training there)."""


def holder_line() -> str:
    """What a lock holder writes into the lock file: 'pid N on HOST since YYYY-MM-DD HH:MM:SS'."""
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@dataclass
class RunLock:
    """An exclusive lock on a run directory, held through `fd` until `release`."""

    directory: Path
    fd: int
    previous: str = ""  # the line a holder that ended without releasing (killed, crashed) left in the lock file
    unsupported: str = ""  # why the filesystem could not lock (then nothing is protected), else ""
    created: bool = False  # whether the directory was made for this lock (see `discard`)

    def takeover_message(self) -> str | None:
        """A line saying whose stale lock this one replaced, or None when the last holder released it cleanly."""
        if not self.previous:
            return None
        found = _HOLDER_RE.match(self.previous)
        state = "ended without releasing it"
        if found and found.group(2) == socket.gethostname() and not _pid_alive(int(found.group(1))):
            state = "is no longer running"
        return f"took over the lock of {self.directory}: its previous holder ({self.previous}) {state}"

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock; idempotent."""
        if self.fd >= 0:
            release_run_lock(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Release the lock and take back what claiming the directory made: the lock file, and the directory itself
        when it was made for it and holds nothing else (a run stopped by an error in its input leaves nothing)."""
        self.release()
        (self.directory / LOCK_FILE).unlink(missing_ok=True)
        if self.created:
            with contextlib.suppress(OSError):  # not empty (someone wrote there meanwhile): leave it
                self.directory.rmdir()


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def release_run_lock(fd: int) -> None:
    """Empty the lock file behind `fd` (its holder ended cleanly) and close it, which drops the lock."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass  # a read-only or vanished file: closing still releases the lock
    os.close(fd)


def _unusable(directory: Path, what: str) -> OutputDirError:
    """An OutputDirError naming the directory, what is wrong and what to do."""
    return OutputDirError(f"output_dir {directory} cannot be used: {what}. Fix that, or choose another output_dir "
                          "(output_dir=...)")


def prepare_output_dir(directory: str | Path) -> Path:
    """Create `directory` if needed and check that files can be created in it; errors name the path and the cause."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise _unusable(path, "it is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file in the place of a parent folder
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise _unusable(path, f"{blocker} is a file, not a directory") from None
    except OSError as err:
        parent = next((p for p in path.parents if p.exists()), path)
        what = f"it cannot be created ({err.strerror}; the nearest existing folder is {parent})"
        raise _unusable(path, what) from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    except OSError as err:
        raise _unusable(path, f"no file can be created in it ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _open_lock_file(path: Path) -> int:
    """The lock file's fd (created if missing)."""
    try:
        return os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unusable(path, f"its lock file {path / LOCK_FILE} cannot be opened ({err.strerror})") from None


def _take(fd: int, directory: Path) -> RunLock:
    """Record this process as the holder of the locked `fd`; remember a stale holder's line."""
    os.lseek(fd, 0, os.SEEK_SET)
    previous = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder_line()}\n".encode(), 0)
    return RunLock(directory, fd, previous)


def try_lock_run(directory: str | Path) -> RunLock | None:
    """The run directory's exclusive lock (the directory is created and checked first), or None when another live
    process holds it. On a filesystem without flock the returned lock has `unsupported` set and protects nothing."""
    path = prepare_output_dir(directory)
    fd = _open_lock_file(path)
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == LOCK_ATTEMPTS - 1:
                os.close(fd)
                return None
            time.sleep(0.05)
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            return RunLock(path, fd, unsupported=f"its filesystem does not support flock ({err.strerror})")
    return _take(fd, path)


def lock_run(directory: str | Path) -> RunLock:
    """The run directory's exclusive lock; RunLockedError naming the holder when another live process has it."""
    lock = try_lock_run(directory)
    if lock is None:
        raise RunLockedError(
            f"output_dir {directory} is in use: another run holds its lock ({lock_holder(directory)}; "
            f"{Path(directory) / LOCK_FILE}). Wait for it to finish or stop it, or choose another output_dir"
        )
    return lock


def adopt_run_lock(directory: str | Path) -> RunLock | None:
    """The lock on `directory` that a parent process passed in CTKD_RUN_LOCK_FD, or None when there is none for it.

    The fd is adopted only if it is the lock file of this very directory (same inode); it is then removed from the
    environment, so that processes started later (a teacher's run, loader workers) do not take it for theirs.
    """
    value = os.environ.get(LOCK_FD_ENV, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(Path(directory) / LOCK_FILE))
    except OSError:
        return None
    if not same:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours through the parent: this only confirms it
    except OSError:
        return None
    del os.environ[LOCK_FD_ENV]
    lock = _take(fd, Path(directory))
    lock.previous = ""  # the line is the parent's, who holds the lock with us and is alive: a hand-over, not a crash
    return lock


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds the run's lock (a dead holder's lock is released by the kernel)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        # a shared probe fails exactly when someone holds the exclusive lock, and is released at once
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: nothing can be known
        return False
    finally:
        os.close(fd)
    return False


def lock_holder(run_dir: str | Path) -> str:
    """'pid N on HOST since ...' as the holder wrote it into the lock file, or 'another process'."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "another process"


def checkpoint_files_size(directory: str | Path) -> int:
    """Bytes of the checkpoints already in `directory` (the series, last.pth, best.pth): part of the peak."""
    total = 0
    for path in Path(directory).glob("*.pth"):
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def check_free_space(directory: str | Path, checkpoint_bytes: int = 0, checkpoint_files: int = 0) -> None:
    """Refuse a run whose output_dir lacks room for its checkpoints at their peak: `checkpoint_files` files of
    `checkpoint_bytes` each (what the retention settings hold at once, see
    ctkd.checkpoint.CheckpointSeries.peak_files) less those already there, plus MIN_FREE_BYTES for logs."""
    need = max(0, checkpoint_files * checkpoint_bytes - checkpoint_files_size(directory)) + MIN_FREE_BYTES
    free = shutil.disk_usage(directory).free
    if free < need:
        estimate = (f"{checkpoint_files} checkpoint files at once, of about {_mib(checkpoint_bytes)} each, "
                    f"plus " if checkpoint_bytes else "")
        raise _unusable(
            Path(directory),
            f"its filesystem has {_mib(free)} free, less than the {_mib(need)} this run needs ({estimate}"
            f"{_mib(MIN_FREE_BYTES)} for logs; checkpoint.keep_last sets how many checkpoints are kept)",
        )


def _mib(size: int) -> str:
    """A byte count in MiB (or GiB), for messages."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
