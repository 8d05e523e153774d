"""Stopping on a signal at a step boundary, with a checkpoint, the same step on every rank.

SLURM sends SIGUSR1 (with ``--signal``) or SIGTERM before it ends or preempts a job, torchrun passes SIGTERM on to its
workers, and Ctrl-C is SIGINT. Each of them only sets a flag here; the training loop reads it at step boundaries
(a host-side bool: no device sync) and, under DDP, agrees on it over all ranks once every `logging.interval` steps, so
every rank stops after the same step, saves one mid-epoch checkpoint and exits with `PREEMPTED_EXIT_CODE`. A second
signal stops at once (the default action), for a run that must die now. Loader workers ignore these signals
(datasets.loader.ignore_stop_signals), so they live until the loop shuts them down.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import torch

from ctkd.distributed import all_reduce, get_world_size

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_EXIT_CODE = 130  # what train.py returns after a saved stop (the shell's code for Ctrl-C)


class StopRequested(Exception):
    """Every rank agreed to stop after `steps` steps of `epoch` (a checkpoint of that point was saved)."""

    def __init__(self, epoch: int, steps: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {steps} of epoch {epoch}")
        self.epoch, self.steps, self.signal_name = epoch, steps, signal_name


class StopFlag:
    """The stop signals' handler: remembers the first signal; a second one gets the signal's default action."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._depth = 0  # nested installs (see install)
        self.on_first: Callable[[str], None] | None = None  # e.g. a log line; called from the handler

    def install(self) -> bool:
        """Catch the stop signals (main thread only, where Python delivers them); False if not possible.

        Nested runs (a teacher trained first by the student's run) share the outer run's handlers: only the
        outermost install and its restore change them.
        """
        if threading.current_thread() is not threading.main_thread():
            return False
        self._depth += 1
        if self._depth == 1:
            self.received = None
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        """Put back the handlers that were there before the outermost `install`."""
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._put_back()

    def _put_back(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second signal: stop now
            self._put_back()
            signal.raise_signal(signum)
            return
        self.received = signum
        if self.on_first is not None:
            self.on_first(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        """The received signal's name ("SIGTERM"), or "" if none."""
        return signal.Signals(self.received).name if self.received is not None else ""


STOP = StopFlag()


def stop_agreed(step_count: int, interval: int, device: torch.device) -> bool:
    """Whether every rank stops now, after `step_count` steps of the epoch.

    One process reads its flag at every step boundary. Several agree once per `interval` steps (and at the epoch's
    end, `interval` = 1) with one all-reduce of their flags, so they stop at the same step; between those points
    they never read each other's flags.
    """
    if get_world_size() == 1:
        return STOP.received is not None
    if step_count % interval:
        return False
    flag = torch.full((1,), 1.0 if STOP.received is not None else 0.0, device=device)
    return bool(all_reduce(flag).item() > 0)
