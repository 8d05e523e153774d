"""What every command-line entry point shares: a quiet end when its output is cut short."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable


def exit_with(main: Callable[[], int]) -> None:
    """Exit with `main()`'s status; a reader that closes the pipe early (`... | head`) ends the command quietly, as
    a Unix tool does, instead of with a BrokenPipeError traceback."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit: let that write go nowhere
        status = 0
    sys.exit(status)
