"""Stopping on a signal at a step boundary, with a checkpoint, the same step on every rank.

SLURM sends SIGUSR1 (with ``--signal``) or SIGTERM before it ends or preempts a job, torchrun passes SIGTERM on to its
workers, and Ctrl-C is SIGINT. Each of them only sets a flag here; the training loop reads it at step boundaries
(a host-side bool: no device sync) and, under DDP, agrees on it over all ranks once every `logging.interval` steps, so
every rank stops after the same step, saves one mid-epoch checkpoint and exits with `PREEMPTED_EXIT_CODE`.

Copies of one request are one request: a scheduler signals every process of a job at once and torchrun forwards the
signal it got to its workers, so each worker receives it twice within milliseconds. Only a signal that comes more
than `REPEAT_AFTER_S` seconds after the first stops at once (the default action), for a run that must die now, and
never while the stop checkpoint is being written (`STOP.deferred()`). Loader workers ignore these signals
(datasets.loader.ignore_stop_signals), so they live until the loop shuts them down.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_EXIT_CODE = 130  # what train.py returns after a saved stop (the shell's code for Ctrl-C)
REPEAT_AFTER_S = 5.0  # a stop signal this long after the first is a new request (stop at once), not a copy of it


class StopRequested(Exception):
    """Every rank agreed to stop after `steps` steps of `epoch` (a checkpoint of that point was saved)."""

    def __init__(self, epoch: int, steps: int, signal_name: str) -> None:
        where = f"epoch {epoch}" if epoch > 0 else f"run epoch {epoch} (an initialisation stage's epochs are ≤ 0)"
        super().__init__(f"stopped by {signal_name} after step {steps} of {where}")
        self.epoch, self.steps, self.signal_name = epoch, steps, signal_name


class StopFlag:
    """The stop signals' handler: remembers the first signal; copies of it that arrive together are ignored, and a
    later one gets the signal's default action (after the stop checkpoint, if one is being written)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}
        self._depth = 0  # nested installs (see install)
        self._deferring = 0  # inside `deferred()`: a "stop at once" waits for its end
        self._pending: int | None = None  # a "stop at once" that arrived while deferring
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
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signum, now
            if self.on_first is not None:
                self.on_first(signal.Signals(signum).name)
            return
        if now - self._received_at < REPEAT_AFTER_S:
            return  # the same request again (sent to the whole job, and forwarded by torchrun)
        if self._deferring:
            self._pending = signum  # the stop checkpoint is being written: die right after it
            return
        self._die(signum)

    def _die(self, signum: int) -> None:
        """The signal's default action (a run that must end now)."""
        self._put_back()
        signal.raise_signal(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While the body runs (the stop checkpoint's write), a "stop at once" waits for it to finish."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            pending, self._pending = self._pending, None
            if pending is not None and not self._deferring:
                self._die(pending)

    @staticmethod
    @contextlib.contextmanager
    def ignored() -> Iterator[None]:
        """Ignore the stop signals while the body runs: a run that stopped at its checkpoint is leaving, and a late
        copy of the request (or torchrun's closing SIGTERM once a peer has exited) must not kill it on the way out.
        The handlers are put back after (train.py may be called in a longer-lived process)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def name(self) -> str:
        """The received signal's name ("SIGTERM"), or "" if none."""
        return signal.Signals(self.received).name if self.received is not None else ""


STOP = StopFlag()
