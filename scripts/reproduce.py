"""Run every (cell, seed) of a table file (docs/tables.md), teachers first; resumable, and safe to start twice.

    python scripts/reproduce.py TABLE [--seeds 0 1] [--devices cpu|0,1] [--runs-per-device K] [--retry-failed]
                                     [--set KEY=VALUE ...]   (e.g. --set data.root=/data/cifar, for every run)
    python scripts/reproduce.py TABLE --dry-run | --status
    python scripts/reproduce.py TABLE --slurm [--slurm-args --partition=gpu --gres=gpu:1 ...]   (slurm-args last)
    python scripts/reproduce.py TABLE --only-index I

TABLE is a table file or its name in configs/tables. Each run is an ordinary
`python train.py --config CFG [overrides] output_dir=<runs-root>/tables/<table>/<row>/<column>/seed<k> seed=<k>
--resume auto` started from the repository root, its output appended to train.log in the run directory. The runner
holds an exclusive lock (flock on <run_dir>/.lock) while a run trains and passes it to its train.py (which adopts it
through CTKD_RUN_LOCK_FD instead of locking again), so runners started together on one table never train a run twice,
and neither does a train.py started by hand into the same directory. Done runs are skipped, interrupted ones resume,
failed ones (a FAILED file) are retried only with --retry-failed. Exit status: 0 when every run is done or running
elsewhere, 1 if any failed (or the input is wrong), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

try:
    import ctkd  # noqa: F401
except ImportError:  # run as `python scripts/reproduce.py` without an install: only scripts/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctkd.cli import exit_with  # noqa: E402
from ctkd.errors import UserError  # noqa: E402
from ctkd.locks import LOCK_FD_ENV, release_run_lock, try_lock_run  # noqa: E402
from ctkd.tables import (  # noqa: E402
    FAILED_FILE,
    RUN_STATES,
    Cell,
    RunStatus,
    Table,
    find_table,
    inspect_run,
    load_table,
    lock_holder,
    run_dir,
    table_root,
    teacher_run_dir,
)

PROG = "reproduce.py"
POLL_S = 0.2  # how often running children and locked teachers are looked at
LOG_TAIL = 20  # lines of train.log shown for a failed run
STOP_TIMEOUT_S = 120  # how long a child may take to save its checkpoint after Ctrl-C before it is killed
BAR_WIDTH = 40


@dataclass
class Job:
    """One train.py run: a teacher, or a (cell, seed)."""

    label: str
    run_dir: Path
    argv: list[str]  # the train.py command line without the interpreter
    plan: dict[str, Any]  # the experiment this run trains, as a resolved config of plain types
    cell: Cell | None = None  # None for a teacher
    needs: str | None = None  # label of the teacher job this run waits for

    @property
    def command(self) -> str:
        """The command as a user would type it."""
        return shlex.join(["python", *self.argv])

    def status(self) -> RunStatus:
        """What the run directory holds, compared with this job's experiment."""
        return inspect_run(self.run_dir, self.plan)


@dataclass
class Outcome:
    """How a job ended in this invocation: done, trained, elsewhere, failed, interrupted or blocked."""

    kind: str
    detail: str = ""


@dataclass
class Running:
    """A started child with its lock and log."""

    job: Job
    proc: subprocess.Popen
    lock_fd: int
    log: IO[bytes]


@dataclass
class Plan:
    """The jobs of one invocation: teachers first, then cells in table order."""

    teachers: list[Job] = field(default_factory=list)
    cells: list[Job] = field(default_factory=list)

    @property
    def jobs(self) -> list[Job]:
        """Teachers first, so that one slot trains them before the cells that need them."""
        return [*self.teachers, *self.cells]


# ---------------------------------------------------------------------------------------------------------- planning
def _load(config: str, overrides: Sequence[str], where: str) -> Any:
    """The validated config; an error names the table entry it came from."""
    from ctkd.config import load_config  # imports the components (torch): only when a table is planned

    try:
        return load_config(config, overrides)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def _plain(cfg: Any, **changes: Any) -> dict[str, Any]:
    """A validated config (with `changes`) as nested plain dicts, the form of a run's config.yaml."""
    import dataclasses

    from ctkd.config import config_to_dict

    return config_to_dict(dataclasses.replace(cfg, **changes))


def _teacher_job(table: Table, name: str, config: str, root: Path, common: Sequence[str] = ()) -> Job:
    """The run that trains teacher `name` once for the whole table."""
    where = f"{table.path}: teachers.{name}"
    cfg = _load(config, common, where)
    if cfg.student.name != name:
        raise UserError(f"{where}: {config} trains {cfg.student.name}, not {name}")
    directory = teacher_run_dir(table, name, root)
    argv = ["train.py", "--config", config, *common, f"output_dir={directory}", "--resume", "auto"]
    return Job(f"teacher {name}", directory, argv, _plain(cfg))


def _teacher_config(table: Table, cell: Cell, cfg: Any) -> str:
    """The config that trains the cell's missing teacher: the table's entry, else the config's teacher.train_config."""
    config = table.teachers.get(cfg.teacher.name) or cfg.teacher.train_config
    if config is None:
        raise UserError(
            f"{table.path}: cells.{cell.row}.{cell.column}: teacher.checkpoint {cfg.teacher.checkpoint} does not exist "
            f"and the table has no 'teachers.{cfg.teacher.name}' entry to train it; add one or download the teacher"
        )
    return config


def make_plan(
    table: Table, seeds: Sequence[int], root: Path, only_index: int | None = None, common: Sequence[str] = ()
) -> Plan:
    """Every job of the table (or of its run number `only_index`), with the teachers the cells need; `common`
    overrides (e.g. data.root=...) apply to every run, after the cell's own."""
    runs = table.runs(seeds)
    if only_index is not None:
        if not 0 <= only_index < len(runs):
            raise UserError(f"--only-index {only_index} is out of range: the table has {len(runs)} runs "
                            f"(0..{len(runs) - 1})")
        runs = [runs[only_index]]
    plan, teachers, configs = Plan(), {}, {}
    for cell, seed in runs:
        where = f"{table.path}: cells.{cell.row}.{cell.column}"
        if cell not in configs:  # one load per cell: the seed does not change the epochs or the teacher
            configs[cell] = _load(cell.config, (*cell.overrides, *common), where)
        cfg = configs[cell]
        directory = run_dir(table, cell, seed, root)
        extra, needs = [f"output_dir={directory}", f"seed={seed}"], None
        # a published teacher file at the configured path always wins over training one
        if cfg.teacher.checkpoint is not None and not Path(cfg.teacher.checkpoint).is_file():
            name = cfg.teacher.name
            if name not in teachers:
                teachers[name] = _teacher_job(table, name, _teacher_config(table, cell, cfg), root, common)
                plan.teachers.append(teachers[name])
            extra.append(f"teacher.checkpoint={teachers[name].run_dir / 'best.pth'}")
            needs = teachers[name].label
        argv = ["train.py", "--config", cell.config, *cell.overrides, *common, *extra, "--resume", "auto"]
        plan.cells.append(Job(f"{cell.row}/{cell.column} seed {seed}", directory, argv, _plain(cfg, seed=seed), cell,
                              needs))
    return plan


# ----------------------------------------------------------------------------------------------------------- locking
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


# ----------------------------------------------------------------------------------------------------------- running
def log_tail(directory: Path, lines: int = LOG_TAIL) -> list[str]:
    """The last lines of the run's train.log."""
    try:
        text = (directory / "train.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ["(no train.log)"]
    return text.splitlines()[-lines:]


class Scheduler:
    """Runs jobs on slots (one per device and run-per-device), teachers before the cells that need them."""

    def __init__(self, plan: Plan, slots: list[dict[str, str] | None], retry_failed: bool) -> None:
        """`slots`: per slot, the CUDA_VISIBLE_DEVICES to set (None: leave the environment alone)."""
        self.pending = plan.jobs
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
        """Start ready jobs on free slots."""
        for slot in range(len(self.slots)):
            if slot in self.running:
                continue
            claimed = self._claim_next()
            if claimed is None:
                return
            self._start(slot, *claimed)

    def _claim_next(self) -> tuple[Job, int] | None:
        """The first job with its teacher ready, locked for this process; settles those with nothing to do here."""
        for job in list(self.pending):
            if job.needs is not None:
                dep = self.outcomes.get(job.needs)
                if dep is None:
                    continue  # its teacher is still training (here or elsewhere)
                if dep.kind not in ("done", "trained"):
                    self._settle(job, Outcome("blocked", f"its {job.needs} did not finish"))
                    continue
            claimed = self._claim(job)
            if claimed is not None:
                return job, claimed
        return None

    def _settle(self, job: Job, outcome: Outcome) -> None:
        """Record how `job` ended and drop it from the queue."""
        self.pending.remove(job)
        self.outcomes[job.label] = outcome
        if outcome.kind == "elsewhere":
            print(f"skip {job.label}: running in {outcome.detail}", flush=True)
        elif outcome.kind in ("blocked", "conflict"):
            print(f"skip {job.label}: {outcome.detail}", flush=True)

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

    def _start(self, slot: int, job: Job, lock_fd: int) -> None:
        """Start train.py for `job`, appending its output to train.log."""
        (job.run_dir / FAILED_FILE).unlink(missing_ok=True)
        log = open(job.run_dir / "train.log", "ab")  # noqa: SIM115 - closed when the child is reaped
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {stamp} {PROG} (pid {os.getpid()} on {socket.gethostname()}): {job.command}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.slots[slot] or {}), LOCK_FD_ENV: str(lock_fd)}
        # own session: a terminal Ctrl-C reaches only this runner, which passes exactly one SIGINT on to each child;
        # the child keeps a copy of the lock fd and adopts it (LOCK_FD_ENV) rather than locking the directory again,
        # so the run stays locked even if this runner is killed
        proc = subprocess.Popen([sys.executable, *job.argv], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, pass_fds=(lock_fd,))
        where = f" on GPU {self.slots[slot]['CUDA_VISIBLE_DEVICES']}" if self.slots[slot] else ""
        print(f"start {job.label}{where}: {job.run_dir}", flush=True)
        self.pending.remove(job)
        self.running[slot] = Running(job, proc, lock_fd, log)

    def _reap(self) -> None:
        """Finish every child that has exited."""
        for slot, item in list(self.running.items()):
            code = item.proc.poll()
            if code is not None:
                del self.running[slot]
                self._finish(item, code)

    def _finish(self, item: Running, code: int) -> None:
        """Record a child's result, mark a failure with FAILED, release the lock."""
        job = item.job
        item.log.close()
        try:
            if code == 0 and job.status().state == "done":
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
                (job.run_dir / FAILED_FILE).write_text(f"{code}\n{reason}\n{job.command}\n", encoding="utf-8")
            self.outcomes[job.label] = Outcome("failed", reason)
            print(f"FAIL  {job.label}: {reason} (see {job.run_dir / 'train.log'})", flush=True)
        finally:
            release_run_lock(item.lock_fd)

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
            release_run_lock(item.lock_fd)  # no FAILED marker: an interrupted run resumes next time
        self.running.clear()


# ---------------------------------------------------------------------------------------------------------- commands
def parse_devices(text: str | None) -> list[str] | None:
    """'cpu' → None; '0,1' → ['0', '1']; None → every visible GPU, or None without CUDA."""
    if text is None:
        import torch  # only to count the GPUs

        count = torch.cuda.device_count()
        return [str(i) for i in range(count)] if count else None
    if text == "cpu":
        return None
    devices = [part.strip() for part in text.split(",")]
    if not devices or not all(d.isdigit() for d in devices):
        raise UserError(f"--devices must be 'cpu' or a list of GPU indices such as 0,1, got {text!r}")
    return devices


def make_slots(devices: list[str] | None, per_device: int) -> list[dict[str, str] | None]:
    """One slot per (device, run on it); indices count within this process's own CUDA_VISIBLE_DEVICES (SLURM)."""
    if devices is None:
        return [None]  # on the CPU runs go one at a time
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    mapping = [v.strip() for v in visible.split(",")] if visible else None
    slots: list[dict[str, str] | None] = []
    for device in devices:
        index = int(device)
        if mapping is not None and index >= len(mapping):
            raise UserError(f"--devices {device}: only {len(mapping)} GPU(s) are visible "
                            f"(CUDA_VISIBLE_DEVICES={visible})")
        physical = mapping[index] if mapping is not None else device
        slots.extend({"CUDA_VISIBLE_DEVICES": physical} for _ in range(per_device))
    return slots


def dry_run(plan: Plan) -> int:
    """Print the command of every job that is not done, teachers first; touch nothing."""
    done = {job.label for job in plan.jobs if job.status().state == "done" and job.status().matches_plan}
    print(f"# {len(plan.jobs) - len(done)} of {len(plan.jobs)} runs to do, from the repository root, each with its "
          f"output appended to <run_dir>/train.log:")
    for job in plan.jobs:
        print(f"# done: {job.label} ({job.run_dir})" if job.label in done else job.command)
    return 0


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """'[#####-----] 2/4 done (50%)'."""
    filled = width * done // total if total else width
    percent = 100 * done // total if total else 100
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} done ({percent}%)"


def _counts(states: Sequence[str]) -> str:
    """'done 2  running 0  ...' in RUN_STATES order."""
    return "  ".join(f"{state} {states.count(state)}" for state in RUN_STATES)


def status(table: Table, plan: Plan) -> int:
    """Counts per state and a progress bar over the table's runs, then per teacher and per cell, from what each run
    directory holds; runs done or started under other settings than the plan's are named with their differences."""
    found = {job.label: job.status() for job in plan.jobs}
    cell_states = [found[job.label].state for job in plan.cells]
    matching = [job for job in plan.cells if found[job.label].matches_plan]
    print(f"{table.name}: {table.title}")
    print(progress_bar(sum(1 for job in matching if found[job.label].state == "done"), len(plan.cells)))
    print(_counts(cell_states))
    for job in plan.teachers:
        print(f"  {job.label}: {found[job.label].describe()} ({job.run_dir})")
    by_cell: dict[Cell, list[Job]] = {}
    for job in plan.cells:
        by_cell.setdefault(job.cell, []).append(job)
    width = max((len(f"{c.row}/{c.column}") for c in by_cell), default=0)
    for cell, jobs in by_cell.items():
        states = [found[job.label].state for job in jobs]
        done = sum(1 for job in jobs if found[job.label].state == "done" and found[job.label].matches_plan)
        others = "  ".join(f"{s} {states.count(s)}" for s in RUN_STATES[1:] if states.count(s))
        print(f"  {f'{cell.row}/{cell.column}':<{width}}  {done}/{len(jobs)} done  {others}".rstrip())
        for job in jobs:
            status_now = found[job.label]
            if status_now.state in ("failed", "running") or not status_now.matches_plan:
                print(f"      seed {job.label.rsplit(' ', 1)[-1]}: {status_now.describe()}")
    return 0


def write_slurm(table_arg: str, table: Table, count: int, args: argparse.Namespace) -> int:
    """Write an sbatch array over the table's runs (one task per run index) and print how to submit it."""
    root = table_root(table, args.runs_root)
    options = [f"--runs-root {shlex.quote(str(args.runs_root))}"]
    if args.seeds is not None:
        options.append("--seeds " + " ".join(map(str, args.seeds)))
    if args.retry_failed:
        options.append("--retry-failed")
    options += [f"--set {shlex.quote(item)}" for item in args.overrides]
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by scripts/reproduce.py for table {table.name}: one array task per (cell, seed).",
        "# Resubmitting is safe: done runs are skipped, interrupted ones resume, a run (or teacher) locked by another",
        "# task is left to it; the teachers are trained once, by the first task that needs them.",
        f"#SBATCH --job-name=ctkd-{table.name}",
        f"#SBATCH --array=0-{count - 1}",
        f"#SBATCH --output={root}/slurm-%A_%a.out",
        *(f"#SBATCH {arg}" for arg in args.slurm_args or []),
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"{shlex.quote(sys.executable)} scripts/reproduce.py {shlex.quote(table_arg)} "
        f"--only-index \"$SLURM_ARRAY_TASK_ID\" {' '.join(options)}",
        "",
    ]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "slurm_array.sbatch"
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {path} ({count} array tasks); submit it with:")
    print(f"sbatch {shlex.quote(str(path))}")
    return 0


def report(scheduler: Scheduler, plan: Plan) -> int:
    """Summary of this invocation and the log tail of every failed run; 1 if any run failed or could not start."""
    outcomes = scheduler.outcomes
    kinds = [o.kind for o in outcomes.values()]
    print(f"\n{len(plan.jobs)} runs: {kinds.count('done') + kinds.count('trained')} done "
          f"({kinds.count('trained')} trained now), {kinds.count('elsewhere')} running elsewhere, "
          f"{kinds.count('failed')} failed, {kinds.count('interrupted')} interrupted, "
          f"{kinds.count('blocked')} not started (their teacher did not finish), "
          f"{kinds.count('conflict')} left alone (their directory holds another experiment)")
    failed = [job for job in plan.jobs if outcomes[job.label].kind == "failed"]
    for job in failed:
        print(f"\nFAILED {job.label}: {outcomes[job.label].detail}; {job.run_dir / 'train.log'} ends with:")
        print("\n".join(f"    {line}" for line in log_tail(job.run_dir)))
    if failed:
        print("\nfix the cause, then run again with --retry-failed")
    return 1 if failed or {"blocked", "interrupted", "conflict"} & set(kinds) else 0


def execute(plan: Plan, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Train every job; Ctrl-C (or SIGTERM, e.g. from SLURM) stops the children at a checkpoint and exits 130."""
    scheduler = Scheduler(plan, make_slots(parse_devices(args.devices), args.runs_per_device), args.retry_failed)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # while stopping: a second one as Ctrl-C
    try:
        scheduler.run()  # SIGTERM stops it as Ctrl-C does: the children save
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping {len(scheduler.running)} run(s) at their last checkpoint", flush=True)
        scheduler.stop()
        command = shlex.join(["python", "scripts/reproduce.py", *argv])
        print(f"interrupted; every run resumes where it stopped. Continue with: {command}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return report(scheduler, plan)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line contract (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="table file, or its name in configs/tables (e.g. cifar_kd)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run instead of the table's")
    parser.add_argument("--devices", help="'cpu' (one run at a time) or GPU indices such as 0,1 "
                                          "(default: every visible GPU, else cpu)")
    parser.add_argument("--runs-per-device", type=int, default=1, metavar="K", help="concurrent runs per GPU")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"), help="runs go to RUNS_ROOT/tables/<table>/")
    parser.add_argument("--retry-failed", action="store_true", help="run again the runs marked FAILED")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, teachers included (repeatable), e.g. "
                             "--set data.root=/data/cifar")
    parser.add_argument("--only-index", type=int, metavar="I", help="run only the I-th (cell, seed) (SLURM arrays)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run and write nothing")
    mode.add_argument("--status", action="store_true", help="print the state of every run")
    mode.add_argument("--slurm", action="store_true", help="write an sbatch array script over the runs")
    parser.add_argument("--slurm-args", nargs=argparse.REMAINDER, help="#SBATCH options for --slurm (last option)")
    args = parser.parse_args(argv)
    if args.runs_per_device < 1:
        parser.error("--runs-per-device must be at least 1")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeated seeds: {args.seeds}")
    if args.slurm_args and not args.slurm:
        parser.error("--slurm-args needs --slurm")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Plan the table's runs, then dry-run, report, write the SLURM array or train them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if not Path("train.py").is_file():
            raise UserError("run this from the repository root (where train.py is): paths in tables are relative to it")
        table = load_table(find_table(args.table))
        seeds = args.seeds if args.seeds is not None else table.seeds
        if args.slurm:
            return write_slurm(args.table, table, len(table.runs(seeds)), args)
        plan = make_plan(table, seeds, args.runs_root, args.only_index, args.overrides)
        if args.dry_run:
            return dry_run(plan)
        if args.status:
            return status(table, plan)
        return execute(plan, args, argv)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while planning: nothing was started
        print(f"{PROG}: interrupted before any run started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_with(main)
