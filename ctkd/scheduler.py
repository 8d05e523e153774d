"""Running a table's plan: units of work on slots (one per device and unit on it), teachers before the cells that
need them, each train.py holding its run directories' locks, so runners started together never train a run twice.
A unit is one run, or a cohort of runs trained by one train.py (ctkd.cohort, ctkd.table_plan.cohort_units)."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ctkd.locks import LOCK_FD_ENV, lock_holder, release_run_lock, try_lock_run
from ctkd.runs import FAILED_FILE
from ctkd.table_plan import Job, Plan, cohort_argv, cohort_units

RUNNER = "reproduce.py"  # named in each run's train.log
POLL_S = 0.2  # how often running children and locked teachers are looked at
LOG_TAIL = 20  # lines of train.log shown for a failed run
STOP_TIMEOUT_S = 120  # how long a child may take to save its checkpoint after Ctrl-C before it is killed


@dataclass
class Outcome:
    """How a job ended in this invocation: done, trained, elsewhere, failed, interrupted or blocked."""

    kind: str
    detail: str = ""


@dataclass
class Running:
    """A started child with its runs, their locks, its command and log."""

    jobs: list[Job]
    proc: subprocess.Popen
    lock_fds: list[int]
    log: IO[bytes]
    command: str


def try_lock(directory: Path) -> int | None:
    """The fd of the run's exclusive lock (ctkd.runs), or None when another live process holds it.

    The train.py started for the run adopts this lock through CTKD_RUN_LOCK_FD instead of taking its own.
    """
    lock = try_lock_run(directory)
    if lock is None:
        return None
    if lock.unsupported:
        print(f"warning: {directory} cannot be locked ({lock.unsupported}): two runners could train it at once",
              flush=True)
    elif lock.takeover_message():
        print(lock.takeover_message(), flush=True)
    return lock.fd


def log_tail(directory: Path, lines: int = LOG_TAIL) -> list[str]:
    """The last lines of the run's train.log."""
    try:
        text = (directory / "train.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ["(no train.log)"]
    return text.splitlines()[-lines:]


class Scheduler:
    """Runs units (a run, or a cohort of runs) on slots (one per device and run-per-device), teachers before the
    cells that need them."""

    def __init__(self, plan: Plan, slots: list[dict[str, str] | None], retry_failed: bool,
                 cohort_size: int = 1) -> None:
        """`slots`: per slot, the CUDA_VISIBLE_DEVICES to set (None: leave the environment alone); `cohort_size`:
        the most runs one train.py trains as a cohort (1: each run alone)."""
        self.pending = cohort_units(plan, cohort_size)
        self.slots = slots
        self.retry_failed = retry_failed
        self.running: dict[int, Running] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.waiting_told: set[str] = set()

    def run(self) -> None:
        """Start, watch and finish jobs until none is left, or until Ctrl-C or SIGTERM (KeyboardInterrupt).

        The signals only set a flag, read between steps of this loop: a stop never lands between the start of a
        child and its registration (it would miss that child)."""
        requested: list[int] = []
        handlers = {sig: signal.signal(sig, lambda signum, frame: requested.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.pending or self.running:
                self._reap()
                if requested:
                    raise KeyboardInterrupt
                self._fill()
                if self.pending or self.running:
                    time.sleep(POLL_S)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _fill(self) -> None:
        """Start ready units on free slots."""
        for slot in range(len(self.slots)):
            if slot in self.running:
                continue
            claimed = self._claim_next()
            if claimed is None:
                return
            self._start(slot, claimed)

    def _claim_next(self) -> list[tuple[Job, int]] | None:
        """The runs of the first unit with its teacher ready that are to be trained here, locked for this process;
        settles those with nothing to do here."""
        for unit in list(self.pending):
            needs = unit[0].needs
            if needs is not None:
                dep = self.outcomes.get(needs)
                if dep is None:
                    continue  # its teacher is still training (here or elsewhere)
                if dep.kind not in ("done", "trained"):
                    for job in list(unit):
                        self._settle(job, Outcome("blocked", f"its {needs} did not finish"))
                    continue
            claimed = [(job, fd) for job in list(unit) if (fd := self._claim(job)) is not None]
            if claimed:
                return claimed
        return None

    def _settle(self, job: Job, outcome: Outcome) -> None:
        """Record how `job` ended and drop it from the queue."""
        self._drop(job)
        self.outcomes[job.label] = outcome
        if outcome.kind == "elsewhere":
            print(f"skip {job.label}: running in {outcome.detail}", flush=True)
        elif outcome.kind in ("blocked", "conflict"):
            print(f"skip {job.label}: {outcome.detail}", flush=True)

    def _drop(self, job: Job) -> None:
        """Take `job` out of its pending unit (and the unit out of the queue once it is empty)."""
        for unit in self.pending:
            if job in unit:
                unit.remove(job)
        self.pending = [unit for unit in self.pending if unit]

    def _settled_by_its_directory(self, job: Job) -> bool:
        """Settle `job` from what its run directory holds: done already, a run of another experiment (never retrained
        over, never counted), or failed before (without --retry-failed); False when it is to be trained."""
        status = job.status()
        if status.state in ("done", "interrupted") and not status.matches_plan:
            self._settle(job, Outcome("conflict", f"{status.describe()}: not trained over; move it away, or run the "
                                                  "table with the settings it was run with"))
        elif status.state == "done":
            self._settle(job, Outcome("done"))
        elif status.state == "failed" and not self.retry_failed:
            self._settle(job, Outcome("failed", f"failed before ({status.detail}); not retried without --retry-failed"))
        else:
            return False
        return True

    def _claim(self, job: Job) -> int | None:
        """The job's lock fd when it has to be trained here; otherwise settles it (done, elsewhere, failed before)."""
        if self._settled_by_its_directory(job):
            return None
        fd = try_lock(job.run_dir)
        if fd is None:
            if job.cell is None:  # cells need this teacher: wait for the other process to finish it
                if job.label not in self.waiting_told:
                    print(f"waiting for {job.label}: {lock_holder(job.run_dir)} is training it", flush=True)
                    self.waiting_told.add(job.label)
                return None
            self._settle(job, Outcome("elsewhere", lock_holder(job.run_dir)))
            return None
        # looked at again under the lock: another runner may have finished or failed it in the meantime
        if self._settled_by_its_directory(job):
            release_run_lock(fd)
            return None
        return fd

    def _start(self, slot: int, claimed: list[tuple[Job, int]]) -> None:
        """Start train.py for the claimed runs (a cohort when several), appending its output to the run's train.log
        (a cohort's to cohort.log in its first run's directory; each run's own lines go to its train.log)."""
        jobs, fds = [job for job, _ in claimed], [fd for _, fd in claimed]
        command = shlex.join(["python", *cohort_argv(jobs)])
        output = jobs[0].run_dir / ("train.log" if len(jobs) == 1 else "cohort.log")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = f"=== {stamp} {RUNNER} (pid {os.getpid()} on {socket.gethostname()}): {command}\n"
        for job in jobs:
            (job.run_dir / FAILED_FILE).unlink(missing_ok=True)
            if len(jobs) > 1:
                with open(job.run_dir / "train.log", "a", encoding="utf-8") as log_file:
                    log_file.write(f"=== {stamp} {RUNNER}: in a cohort of {len(jobs)} runs, output in {output}\n")
        log = open(output, "ab")  # noqa: SIM115 - closed when the child is reaped
        log.write(header.encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.slots[slot] or {}),
               LOCK_FD_ENV: ",".join(map(str, fds))}
        # own session: a terminal Ctrl-C reaches only this runner, which passes exactly one SIGINT on to each child;
        # the child keeps a copy of the lock fds and adopts them (LOCK_FD_ENV) rather than locking the directories
        # again, so the runs stay locked even if this runner is killed
        proc = subprocess.Popen([sys.executable, *cohort_argv(jobs)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, pass_fds=tuple(fds))
        where = f" on GPU {self.slots[slot]['CUDA_VISIBLE_DEVICES']}" if self.slots[slot] else ""
        what = jobs[0].label if len(jobs) == 1 else f"cohort of {len(jobs)}: {', '.join(job.label for job in jobs)}"
        print(f"start {what}{where}: {jobs[0].run_dir if len(jobs) == 1 else output}", flush=True)
        for job in jobs:
            self._drop(job)
        self.running[slot] = Running(jobs, proc, fds, log, command)

    def _reap(self) -> None:
        """Finish every child that has exited."""
        for slot, item in list(self.running.items()):
            code = item.proc.poll()
            if code is not None:
                del self.running[slot]
                self._finish(item, code)

    def _finish(self, item: Running, code: int) -> None:
        """Record the result of each of a child's runs, mark a failure with FAILED, release the locks."""
        item.log.close()
        for job, fd in zip(item.jobs, item.lock_fds):
            try:
                self._finish_job(job, code, item.command, cohort=len(item.jobs) > 1)
            finally:
                release_run_lock(fd)

    def _finish_job(self, job: Job, code: int, command: str, cohort: bool) -> None:
        """Record how one run of an exited child ended (a cohort exits 1 when one of its runs failed)."""
        if job.status().state == "done" and (code == 0 or cohort):
            self.outcomes[job.label] = Outcome("trained")
            print(f"done  {job.label}", flush=True)
            return
        if code == 130:  # the child itself was interrupted (Ctrl-C sent to it): resumable, not a failure
            self.outcomes[job.label] = Outcome("interrupted", "interrupted (exit status 130); it resumes next time")
            print(f"stop  {job.label}: interrupted; it resumes next time", flush=True)
            return
        if (job.run_dir / FAILED_FILE).is_file():  # train.py recorded why it failed
            reason = f"exit status {code}: {job.status().detail}"
        else:
            reason = (f"exit status {code}" if code
                      else f"exit status 0 but no results for {job.plan['epochs']} epochs")
            (job.run_dir / FAILED_FILE).write_text(f"{code}\n{reason}\n{command}\n", encoding="utf-8")
        self.outcomes[job.label] = Outcome("failed", reason)
        print(f"FAIL  {job.label}: {reason} (see {job.run_dir / 'train.log'})", flush=True)

    def stop(self) -> None:
        """Pass one SIGINT to every child so that it saves and stops; kill the ones that take too long."""
        for item in self.running.values():
            if item.proc.poll() is None:
                item.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        try:
            for item in self.running.values():
                try:
                    item.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    item.proc.kill()
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait for the checkpoints
            for item in self.running.values():
                item.proc.kill()
        for item in self.running.values():
            item.proc.wait()
            item.log.close()
            for fd in item.lock_fds:
                release_run_lock(fd)  # no FAILED marker: an interrupted run resumes next time
        self.running.clear()
