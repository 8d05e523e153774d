"""Train a teacher or distil a student from a YAML config, on one process or under torchrun.

    python train.py --config FILE [--resume PATH|auto] [KEY=VALUE ...]
    python train.py --config FILE --print-config [KEY=VALUE ...]   # the resolved config; nothing is run or written
    torchrun --nproc_per_node=N train.py --config FILE [...]
    python train.py [KEY=VALUE ...] --config A [KEY=VALUE ...] --config B [KEY=VALUE ...] [--resume auto]

With several --config, the runs train as one cohort (docs/cohorts.md): one loader and one teacher forward per batch
for all of them, each run ending exactly as it would alone. Overrides before the first --config apply to every
run, those after a --config to that run only.

Exit status: 0 when the run finished; 1 for an error in the input, reported in one line (config, names, data,
teacher or checkpoint files, an output_dir that another run holds, that cannot be written or whose disk is full);
130 when the run was stopped by SIGTERM, SIGUSR1 or Ctrl-C after saving a checkpoint of the step it stopped at (the
preempted status scripts/slurm_train.sbatch requeues on; a second signal stops at once).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ctkd.config import config_to_yaml, load_config
from ctkd.errors import UserError
from ctkd.logging import get_logger, setup_console
from ctkd.preemption import PREEMPTED_EXIT_CODE, STOP

if TYPE_CHECKING:
    from ctkd.config import Config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line contract: one or more --config, each with the KEY=VALUE overrides after it, optional --resume."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append", help="YAML experiment config (repeat: a cohort)")
    parser.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <output_dir>/last.pth")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (with output_dir) as YAML and exit without running")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/cifar epochs=10")
    args = parser.parse_intermixed_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.members = member_overrides(args.argv, args.config)
    if len(args.members) > 1 and args.resume not in (None, "auto"):
        parser.error("a cohort (several --config) resumes with --resume auto only: each run from its own directory")
    args.config, args.overrides = args.members[0]
    return args


def member_overrides(argv: list[str], configs: list[str]) -> list[tuple[str, list[str]]]:
    """Each --config with its overrides: those before the first --config, then those that follow it."""
    common: list[str] = []
    members: list[tuple[str, list[str]]] = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("--config", "--resume"):
            value = next(tokens, "")
            if token == "--config":
                members.append((value, list(common)))
        elif token.startswith(("--config=", "--resume=")):
            if token.startswith("--config="):
                members.append((token.split("=", 1)[1], list(common)))
        elif not token.startswith("-"):
            (members[-1][1] if members else common).append(token)
    assert [config for config, _ in members] == configs
    return members


def main(argv: list[str] | None = None) -> int:
    """Load the config and train; input errors are reported in one line (rank-prefixed under torchrun).

    The config is read before the trainer (and torch's launcher tooling) is imported, so a config error or
    --print-config answers without loading the training stack."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_console(logging.INFO if rank == 0 else logging.ERROR)  # other ranks print errors only
    where = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        cfgs = [load_config(config, overrides) for config, overrides in args.members]
    except UserError as err:
        get_logger().error(f"{where}error: {err}")
        return 1
    if args.print_config:
        print("---\n".join(config_to_yaml(cfg) for cfg in cfgs), end="")
        return 0
    from torch.distributed.elastic.multiprocessing.errors import record

    # under torchrun, a crash's traceback goes into torchrun's failure summary
    if len(cfgs) > 1:
        return record(train_together)(cfgs, args, rank, where)
    return record(train)(cfgs[0], args, rank, where)


def exit_status(body: Callable[[], int], where: str) -> int:
    """`body()`'s exit status; an input error is one line and status 1 (anything else is a bug or a system failure:
    it keeps its traceback), and either leaves the process group without waiting for the other ranks."""
    from ctkd.distributed import shutdown_distributed

    try:
        return body()
    except UserError as err:
        get_logger().error(f"{where}error: {err}")
        shutdown_distributed(clean=False)
        return 1
    except BaseException:
        shutdown_distributed(clean=False)
        raise


def train(cfg: Config, args: argparse.Namespace, rank: int, where: str) -> int:
    """Run the training of `cfg`; the exit status (0, 1 for an input error, 130 for a saved stop)."""
    from ctkd.distributed import shutdown_distributed
    from ctkd.trainer import RunInterrupted, run

    def body() -> int:
        try:
            run(cfg, resume=args.resume)
        except RunInterrupted as stop:
            with STOP.ignored():  # saved: nothing may kill this rank on its way out
                if rank == 0:  # every rank stops; one line says how to continue
                    get_logger().error(interrupted_message(stop, args))
                shutdown_distributed(clean=stop.signal_name != "")  # stopped after the same step: they leave together
            return PREEMPTED_EXIT_CODE  # 130, the shell's code for a Ctrl-C: scripts/slurm_train.sbatch requeues on it
        shutdown_distributed(clean=True)
        return 0

    return exit_status(body, where)


def interrupted_message(stop: Any, args: argparse.Namespace) -> str:
    """One line on a Ctrl-C: what is saved, and the exact command that continues from it."""
    command = shlex.join(["python", "train.py", "--config", args.config, *args.overrides, "--resume", "auto"])
    if stop.signal_name:  # a stop at a step boundary, saved there
        return (
            f"stopped by {stop.signal_name} after step {stop.saved_steps} of epoch {stop.saved_epoch}: "
            f"{stop.output_dir}/last.pth holds that point; continue with: {command}"
        )
    if stop.saved_epoch is None:
        return f"interrupted before anything was saved in {stop.output_dir}; start again with: {command}"
    return (
        f"interrupted: {stop.output_dir}/last.pth holds epoch {stop.saved_epoch} (or a later step of it); "
        f"continue with: {command}"
    )


def train_together(cfgs: list[Config], args: argparse.Namespace, rank: int, where: str) -> int:
    """Train `cfgs` as one cohort; the exit status: 0 when every run is done (or trained by another process), 1
    for an input error or a failed run, 130 when stopped by a signal (every run saved)."""
    from ctkd.cohort import train_cohort
    from ctkd.distributed import shutdown_distributed

    def body() -> int:
        members = train_cohort(cfgs, [config for config, _ in args.members], resume=args.resume)
        if rank == 0:
            for member in members:
                get_logger().info(f"{member.label} ({member.output_dir}): {member.outcome}"
                                  f"{f' ({member.detail})' if member.detail else ''}")
        outcomes = {member.outcome for member in members}
        with STOP.ignored():
            shutdown_distributed(clean="failed" not in outcomes)
        if "interrupted" in outcomes:
            if rank == 0:
                resume = [] if args.resume else ["--resume", "auto"]
                command = shlex.join(["python", "train.py", *args.argv, *resume])
                get_logger().error(f"stopped: every run saved where it stopped; continue with: {command}")
            return PREEMPTED_EXIT_CODE
        return 1 if "failed" in outcomes else 0

    return exit_status(body, where)


if __name__ == "__main__":
    sys.exit(main())
