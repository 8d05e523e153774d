"""Train a teacher or distil a student from a YAML config, on one process or under torchrun.

    python train.py --config FILE [--resume PATH|auto] [KEY=VALUE ...]
    torchrun --nproc_per_node=N train.py --config FILE [...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from ctkd.config import load_config
from ctkd.distributed import shutdown_distributed
from ctkd.errors import UserError
from ctkd.logging import get_logger, setup_console
from ctkd.trainer import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line contract: --config, optional --resume, then dotted KEY=VALUE overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <output_dir>/last.pth")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/cifar epochs=10")
    return parser.parse_args(argv)


@record  # under torchrun, a crash's traceback goes into torchrun's failure summary
def main(argv: list[str] | None = None) -> int:
    """Load the config and train; input errors are reported in one line (rank-prefixed under torchrun)."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_console(logging.INFO if rank == 0 else logging.ERROR)  # other ranks print errors only
    where = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    clean = False
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, resume=args.resume)
        clean = True
    except UserError as err:  # anything else is a bug or a system failure: it keeps its traceback
        get_logger().error(f"{where}error: {err}")
        return 1
    finally:
        shutdown_distributed(clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
