"""One writer per run directory: its lock (flock, held for the run's life), and the checks that it can be written
and has room for the run's checkpoints.

Only the standard library is used here, so the table scripts use it without importing torch.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ctkd.errors import UserError

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

    The variable holds one fd, or several separated by commas (a cohort's runs, ctkd.cohort). An fd is adopted only
    if it is the lock file of this very directory (same inode); it is then removed from the variable, so that
    processes started later (a teacher's run, loader workers) do not take it for theirs.
    """
    values = [value for value in os.environ.get(LOCK_FD_ENV, "").split(",") if value.isdigit()]
    for value in values:
        lock = _adopt(int(value), Path(directory))
        if lock is not None:
            rest = ",".join(other for other in values if other != value)
            if rest:
                os.environ[LOCK_FD_ENV] = rest
            else:
                del os.environ[LOCK_FD_ENV]
            return lock
    return None


def _adopt(fd: int, directory: Path) -> RunLock | None:
    """The lock `fd` holds when it is `directory`'s lock file, else None."""
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(directory / LOCK_FILE))
    except OSError:
        return None
    if not same:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours through the parent: this only confirms it
    except OSError:
        return None
    lock = _take(fd, directory)
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
    ctkd.series.CheckpointSeries.peak_files) less those already there, plus MIN_FREE_BYTES for logs."""
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
