"""Evaluate a checkpoint (ours, or a teacher file in a published layout) on the config's test set.

    python eval.py --checkpoint RUN_DIR/best.pth [--json] [KEY=VALUE ...]   # our checkpoints carry their config
    python eval.py --config FILE --checkpoint PATH [--json] [KEY=VALUE ...]   # any file, e.g. a published teacher
"""
from __future__ import annotations

import argparse
import json
import sys

from ctkd.config import load_config
from ctkd.errors import UserError
from ctkd.evaluation import config_of_checkpoint, evaluate_checkpoint
from ctkd.logging import get_logger, setup_console


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line contract: --checkpoint, optional --config and --json, then dotted KEY=VALUE overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML config selecting model and data (default: the one stored in the "
                        "checkpoint, for best.pth/last.pth of a ctkd run)")
    parser.add_argument("--checkpoint", required=True, help="best.pth/last.pth of a run, or a teacher file")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/cifar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print top-1/top-5 of the checkpoint's student on the test split."""
    args = parse_args(argv)
    setup_console()
    try:
        if args.config is None:
            cfg = config_of_checkpoint(args.checkpoint, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        metrics = evaluate_checkpoint(cfg, args.checkpoint)
    except UserError as err:  # anything else is a bug or a system failure: it keeps its traceback
        get_logger().error(f"error: {err}")
        return 1
    if args.json:
        print(json.dumps(metrics))
    else:
        name = f"{metrics['model']} on {metrics['dataset']}"
        print(f"{name} test: top-1 {metrics['acc1']:.2f}%  top-5 {metrics['acc5']:.2f}%  loss {metrics['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
