"""Train a teacher or distil a student from a YAML config, on one process or under torchrun.

    python train.py --config FILE [--resume PATH|auto] [KEY=VALUE ...]
    python train.py --config FILE --print-config [KEY=VALUE ...]   # the resolved config; nothing is run or written
    torchrun --nproc_per_node=N train.py --config FILE [...]

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
from typing import TYPE_CHECKING, Any

from ctkd.config import config_to_yaml, load_config
from ctkd.errors import UserError
from ctkd.logging import get_logger, setup_console
from ctkd.preemption import PREEMPTED_EXIT_CODE, STOP

if TYPE_CHECKING:
    from ctkd.config import Config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line contract: --config, optional --resume, then dotted KEY=VALUE overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <output_dir>/last.pth")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (with output_dir) as YAML and exit without running")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/cifar epochs=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the config and train; input errors are reported in one line (rank-prefixed under torchrun).

    The config is read before the trainer (and torch's launcher tooling) is imported, so a config error or
    --print-config answers without loading the training stack."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_console(logging.INFO if rank == 0 else logging.ERROR)  # other ranks print errors only
    where = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as err:
        get_logger().error(f"{where}error: {err}")
        return 1
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from torch.distributed.elastic.multiprocessing.errors import record

    # under torchrun, a crash's traceback goes into torchrun's failure summary
    return record(train)(cfg, args, rank, where)


def train(cfg: Config, args: argparse.Namespace, rank: int, where: str) -> int:
    """Run the training of `cfg`; the exit status (0, 1 for an input error, 130 for a saved stop)."""
    from ctkd.distributed import shutdown_distributed
    from ctkd.trainer import RunInterrupted, run

    try:
        run(cfg, resume=args.resume)
    except UserError as err:  # anything else is a bug or a system failure: it keeps its traceback
        get_logger().error(f"{where}error: {err}")
        shutdown_distributed(clean=False)
        return 1
    except RunInterrupted as stop:
        with STOP.ignored():  # saved: nothing may kill this rank on its way out
            if rank == 0:  # every rank stops; one line says how to continue
                get_logger().error(interrupted_message(stop, args))
            shutdown_distributed(clean=stop.signal_name != "")  # stopped after the same step: they leave together
        return PREEMPTED_EXIT_CODE  # 130, the shell's code for a Ctrl-C: scripts/slurm_train.sbatch requeues on it
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed(clean=True)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
