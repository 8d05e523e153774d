"""Run every (cell, seed) of a table file (docs/tables.md), teachers first; resumable, and safe to start twice.

    python scripts/reproduce.py TABLE [--seeds 0 1] [--devices cpu|0,1] [--runs-per-device K] [--retry-failed]
                                     [--cohort-size N | --no-cohorts]
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
failed ones (a FAILED file) are retried only with --retry-failed.

Cohorts (docs/cohorts.md): the runs of the table that share teacher, data, seed and schedule (the cells of a row, for
one seed) are trained by one train.py with several --config, up to --cohort-size of them (default 16): one loader
and one teacher forward per batch for all, each run ending exactly as it would alone; its output goes to cohort.log
in its first run's directory, each run's own lines to its train.log. --no-cohorts trains every run alone. A cohort
takes a slot as one run does (--runs-per-device K: K cohorts per GPU). Exit status: 0 when every run is done or running
elsewhere, 1 if any failed (or the input is wrong), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import ctkd  # noqa: F401
except ImportError:  # run as `python scripts/reproduce.py` without an install: only scripts/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctkd.cli import exit_with  # noqa: E402
from ctkd.errors import UserError  # noqa: E402
from ctkd.runs import RUN_STATES, RunStatus  # noqa: E402
from ctkd.scheduler import Scheduler, log_tail  # noqa: E402
from ctkd.table_plan import MAX_COHORT, Job, Plan, cohort_argv, cohort_units, make_plan  # noqa: E402
from ctkd.tables import Cell, Table, find_table, load_table, table_root  # noqa: E402

PROG = "reproduce.py"
BAR_WIDTH = 40


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


def dry_run(plan: Plan, cohort_size: int) -> int:
    """Print the command of every unit (a run, or a cohort of runs) that has runs to do, teachers first; touch
    nothing."""
    done = {job.label for job in plan.jobs if job.status().state == "done" and job.status().matches_plan}
    units = cohort_units(plan, cohort_size)
    print(f"# {len(plan.jobs) - len(done)} of {len(plan.jobs)} runs to do, in {sum(1 for u in units if len(u) > 1)} "
          "cohort(s) and single runs, from the repository root, each with its output appended to "
          "<run_dir>/train.log (a cohort's to <first run_dir>/cohort.log):")
    for unit in units:
        for job in unit:
            if job.label in done:
                print(f"# done: {job.label} ({job.run_dir})")
        todo = [job for job in unit if job.label not in done]
        if len(todo) > 1:
            print(f"# cohort of {len(todo)} (one loader, one teacher forward per batch): "
                  f"{', '.join(job.label for job in todo)}")
        if todo:
            print(shlex.join(["python", *cohort_argv(todo)]))
    return 0


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """'[#####-----] 2/4 done (50%)'."""
    filled = width * done // total if total else width
    percent = 100 * done // total if total else 100
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} done ({percent}%)"


def _counts(states: Sequence[str]) -> str:
    """'done 2  running 0  ...' in RUN_STATES order."""
    return "  ".join(f"{state} {states.count(state)}" for state in RUN_STATES)


def status(table: Table, plan: Plan, cohort_size: int) -> int:
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
    print_cohorts(cohort_units(plan, cohort_size), found)
    return 0


def print_cohorts(units: list[list[Job]], found: dict[str, RunStatus]) -> None:
    """The cohorts the runs are (or will be) trained in, with how many of each are done."""
    cohorts = [unit for unit in units if len(unit) > 1]
    if not cohorts:
        return
    print(f"cohorts ({len(cohorts)}, one train.py each):")
    for number, unit in enumerate(cohorts, start=1):
        done = sum(1 for job in unit if found[job.label].state == "done")
        print(f"  cohort {number}: {done}/{len(unit)} done: {', '.join(job.label for job in unit)}")


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
    scheduler = Scheduler(plan, make_slots(parse_devices(args.devices), args.runs_per_device), args.retry_failed,
                          cohort_size(args))
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


def cohort_size(args: argparse.Namespace) -> int:
    """The most runs per cohort: 1 with --no-cohorts."""
    return 1 if args.no_cohorts else args.cohort_size


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
    parser.add_argument("--cohort-size", type=int, default=MAX_COHORT, metavar="N",
                        help=f"the most runs one train.py trains as a cohort (default {MAX_COHORT}; lower it when "
                             "the members' networks do not fit the GPU together)")
    parser.add_argument("--no-cohorts", action="store_true", help="train every run in a train.py of its own")
    parser.add_argument("--only-index", type=int, metavar="I", help="run only the I-th (cell, seed) (SLURM arrays)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run and write nothing")
    mode.add_argument("--status", action="store_true", help="print the state of every run")
    mode.add_argument("--slurm", action="store_true", help="write an sbatch array script over the runs")
    parser.add_argument("--slurm-args", nargs=argparse.REMAINDER, help="#SBATCH options for --slurm (last option)")
    args = parser.parse_args(argv)
    if args.runs_per_device < 1:
        parser.error("--runs-per-device must be at least 1")
    if args.cohort_size < 1:
        parser.error("--cohort-size must be at least 1 (1: no cohorts)")
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
            return dry_run(plan, cohort_size(args))
        if args.status:
            return status(table, plan, cohort_size(args))
        return execute(plan, args, argv)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while planning: nothing was started
        print(f"{PROG}: interrupted before any run started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_with(main)
