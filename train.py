"""Train a teacher or distil a student from a YAML config.

    python train.py --config FILE [--resume PATH|auto] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import sys

from ctkd.config import ConfigError, load_config
from ctkd.logging import get_logger, setup_console
from ctkd.trainer import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line contract: --config, optional --resume, then dotted KEY=VALUE overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <output_dir>/last.pth")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/cifar epochs=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the config, run training, report user errors in one line."""
    args = parse_args(argv)
    setup_console()
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        get_logger().error(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
