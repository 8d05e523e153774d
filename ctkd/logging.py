"""Run outputs: console messages, one JSON line per epoch in `metrics.jsonl`, TensorBoard scalars and histograms."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctkd.errors import UserError
from ctkd.fileio import atomic_write_text

if TYPE_CHECKING:
    import torch

LOGGER_NAME = "ctkd"


def get_logger() -> logging.Logger:
    """The project's logger; `setup_console` decides where it prints."""
    return logging.getLogger(LOGGER_NAME)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of each message (so redirection and capture work)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it; stdout is always used
        pass


def setup_console(level: int = logging.INFO) -> None:
    """Print the project's messages to stdout as 'HH:MM:SS message' (idempotent)."""
    logger = get_logger()
    if not any(isinstance(handler, _StdoutHandler) for handler in logger.handlers):
        logger.addHandler(_StdoutHandler())
    logger.setLevel(level)
    logger.propagate = False


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write `data` as indented JSON atomically (see ctkd.fileio)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class MetricsFileError(UserError, ValueError):
    """A damaged `metrics.jsonl` in a run directory that is being resumed."""


class MetricsLog:
    """Per-epoch records in `metrics.jsonl` and TensorBoard, consistent across interruptions.

    On resume after epoch k (from its epoch-end checkpoint or one taken inside epoch k+1), records of epochs > k
    (written after that checkpoint, before the crash) are dropped from `metrics.jsonl`, and TensorBoard events from
    step k+1 on are purged (also for k = 0: a run that died before its first checkpoint), so every epoch appears
    exactly once with the values of the run that produced the checkpoint.

    Records of a method's initialisation stages (ctkd.stages) carry the run epoch (1−S … 0: before distillation
    epoch 1, so the same truncation and purge apply), ``"stage"`` (its name) and ``"stage_epoch"`` (1-based within
    the stage); their scalars go to TensorBoard as 'stage/<name>/<key>' at the run epoch.
    """

    def __init__(self, output_dir: str | Path, *, start_epoch: int, tensorboard: bool, enabled: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled  # False on ranks other than 0: nothing is read or written
        self.writer = None
        if not enabled:
            return
        self._truncate_after(start_epoch - 1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _after_existing_event_files(Path(output_dir))

            self.writer = SummaryWriter(log_dir=str(output_dir), purge_step=start_epoch)

    def _truncate_after(self, last_epoch: int) -> None:
        """Keep only the records of epochs ≤ `last_epoch`."""
        if not self.path.exists():
            return
        kept = [line for line, record in self._parse() if record["epoch"] <= last_epoch]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _parse(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) pairs of the file. A last line cut short by a crash mid-append is dropped with a warning;
        a damaged line elsewhere is an error naming the file and line."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        parsed = []
        for number, line in enumerate(lines, start=1):
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError as err:
                if number < len(lines):
                    raise MetricsFileError(
                        f"{self.path}, line {number}: not a JSON record ({err}); repair or remove that line"
                    ) from err
                get_logger().warning(f"{self.path}: dropping an incomplete last line (a crash while writing it)")
        return parsed

    def records(self) -> list[dict[str, Any]]:
        """All records written so far."""
        if not self.enabled or not self.path.exists():
            return []
        return [record for _, record in self._parse()]

    def log_epoch(self, record: dict[str, Any], per_sample: dict[str, torch.Tensor] | None = None) -> None:
        """Append one epoch's record; scalars go to TensorBoard under 'train/', 'test/', 'params/' or 'time/', and
        per-sample statistics (instance-wise τ) as histograms 'params/<name>'."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.writer is None:
            return
        epoch, stage = record["epoch"], record.get("stage")
        for key, value in record.items():
            if key not in ("epoch", "stage_epoch", "stage_epochs") and isinstance(value, (int, float)):
                self.writer.add_scalar(_tensorboard_tag(key) if stage is None else _stage_tag(stage, key), value, epoch)
        for name, values in (per_sample or {}).items():
            self.writer.add_histogram(f"params/{name}", values.float().cpu(), epoch)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()


_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def _after_existing_event_files(directory: Path) -> None:
    """Wait (under a second) until a new TensorBoard event file, named by the second it is opened in, sorts after
    every earlier one: TensorBoard reads them in name order, and within one second the names order by a process
    counter as text ('…9' after '…10'), which would replay an earlier session's purge over this one's events."""
    names = [_EVENT_FILE.match(path.name) for path in directory.glob("events.out.tfevents.*")]
    newest = max((int(name.group(1)) for name in names if name), default=None)
    deadline = time.monotonic() + 1.1  # a file stamped in the future (another clock) is not waited for
    while newest is not None and time.time() < newest + 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def _tensorboard_tag(key: str) -> str:
    """'train_loss_kd' → 'train/loss_kd', 'test_acc1' → 'test/acc1', 'epoch_time' → 'time/epoch_s',
    'tau_mean' → 'params/tau_mean' (the schedule's and the temperature's values)."""
    if key == "epoch_time":
        return "time/epoch_s"
    for group in ("train", "test"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1:]}"
    return f"params/{key}"


def _stage_tag(stage: str, key: str) -> str:
    """A stage epoch's scalar: 'train_loss_fsp' → 'stage/<stage>/loss_fsp', 'epoch_time' → 'stage/<stage>/epoch_s',
    'lr' → 'stage/<stage>/lr'."""
    if key == "epoch_time":
        return f"stage/{stage}/epoch_s"
    return f"stage/{stage}/{key.removeprefix('train_')}"
