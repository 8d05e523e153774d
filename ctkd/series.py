"""The run directory's checkpoint series: ``ckpt-e<EEEE>-s<SSSSSS>.pth`` is the state after SSSSSS training steps of
epoch EEEE (an epoch-end checkpoint has all of that epoch's steps and its evaluation); a method's initialisation
stages train the run epochs 1−S … 0 before distillation epoch 1 (ctkd.stages), so their checkpoints are
``ckpt-e-<EEEE>-s<SSSSSS>.pth`` for epoch −EEEE and ``ckpt-e0000-…`` for the last stage epoch, sorted before every
distillation checkpoint; the newest `keep_last` are kept;
``last.pth`` is the newest and ``best.pth`` the best-accuracy epoch's state: hard links to those series files (the
same bytes, no second copy on disk; copies on a filesystem without hard links).
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctkd.checkpoint import load_run_checkpoint
from ctkd.fileio import atomic_copy, atomic_link
from ctkd.integrity import CheckpointError, atomic_save, verify_checksum

_SERIES_NAME = re.compile(r"^ckpt-e(-?\d{4,})-s(\d{6,})\.pth$")
_TEMP_NAME = re.compile(r"^\.(ckpt-e-?\d+-s\d+\.pth|last\.pth|best\.pth)\..+\.tmp$")


@dataclass(frozen=True, order=True)
class Position:
    """Where a checkpoint stands: after `step` training steps of epoch `epoch` (1-based; ≤ 0: a stage epoch)."""

    epoch: int
    step: int

    @property
    def name(self) -> str:
        """The file name of the series checkpoint at this position."""
        sign = "-" if self.epoch < 0 else ""  # a stage epoch before the last one: ckpt-e-0002-s000003.pth
        return f"ckpt-e{sign}{abs(self.epoch):04d}-s{self.step:06d}.pth"

    def __str__(self) -> str:
        return f"epoch {self.epoch}, step {self.step}"


def state_position(state: Mapping[str, Any], steps_per_epoch: int) -> Position:
    """The position of a loaded run checkpoint: inside its epoch_state's epoch, or at the end of epoch `epoch`, or,
    before any distillation epoch, at the end of the last stage epoch done (run epoch done − total ≤ 0)."""
    inside = state.get("epoch_state")
    if inside is not None:
        return Position(int(inside["epoch"]), int(inside["step"]))
    epoch, stages = int(state["epoch"]), state.get("stages")
    if epoch == 0 and stages:
        epoch = int(stages["done"]) - int(stages["total"])
    return Position(epoch, steps_per_epoch)


def series(directory: str | Path) -> list[tuple[Position, Path]]:
    """The series checkpoints in `directory`, oldest first."""
    found = []
    for path in Path(directory).glob("ckpt-e*-s*.pth"):
        match = _SERIES_NAME.match(path.name)
        if match and path.is_file():
            found.append((Position(int(match.group(1)), int(match.group(2))), path))
    return sorted(found)


def set_aside(path: Path, label: str) -> Path:
    """Rename `path` to `<name>.<label>-<local time>` beside it (never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}-{number}")
    os.replace(path, target)
    return target


def check_run_checkpoint(path: Path) -> None:
    """Raise a CheckpointError (naming the file and the reason) unless `path` is an intact run checkpoint.

    A checksummed file is checked by its checksum; one without (version ≤ 2) is loaded in full.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted (empty: 0 bytes)")
    if not verify_checksum(path):
        load_run_checkpoint(path)


def newest_intact_checkpoint(directory: str | Path, warn: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint of the run in `directory` for ``--resume auto``, or None.

    Series checkpoints are tried newest first (``last.pth`` only where there are none: a directory of an earlier
    version); each damaged one is set aside as ``<name>.corrupt-<time>`` with a warning naming it and the reason.
    """
    directory = Path(directory)
    candidates = [path for _, path in reversed(series(directory))]
    if not candidates and (directory / "last.pth").is_file():
        candidates = [directory / "last.pth"]
    for path in candidates:
        try:
            check_run_checkpoint(path)
        except CheckpointError as err:
            moved = set_aside(path, "corrupt")
            warn(f"{err}; set aside as {moved.name}, trying the previous checkpoint")
            continue
        return path
    return None


class CheckpointSeries:
    """Writes the run directory's checkpoints (only rank 0 makes one): the series, ``last.pth`` and ``best.pth``.

    Each save commits a new ``ckpt-*.pth`` (verified, atomic) first, then points ``last.pth`` (and ``best.pth``)
    at it: an atomic hard link (the same verified bytes; a copy where the filesystem has no hard links), and only
    then deletes series checkpoints beyond the newest `keep_last`: never the `protected` one (the checkpoint the
    run was resumed from). A pruned series file lives on as long as last.pth or best.pth links to it. A crash at any
    point leaves the newest committed checkpoint intact; a failed delete is logged and retried at the next save.
    """

    def __init__(self, directory: str | Path, keep_last: int, warn: Callable[[str], None],
                 protected: Position | None = None) -> None:
        self.directory, self.keep_last, self.warn, self.protected = Path(directory), keep_last, warn, protected
        self.links = True  # until the filesystem refuses one

    @staticmethod
    def peak_files(keep_last: int, resumed: bool, links: bool = True) -> int:
        """The most checkpoint files' worth of bytes a run directory holds at once: `keep_last` series files and the
        new one before pruning, best.pth once its series file is pruned, and the checkpoint a run was resumed from;
        without hard links also last.pth and the temporary copy of the next one."""
        return keep_last + 1 + 1 + (1 if resumed else 0) + (0 if links else 2)

    def save(self, state: dict[str, Any], position: Position, *, best: bool = False) -> Path:
        """Commit `state` as the series checkpoint at `position`, update last.pth (and best.pth), then prune."""
        path = self.directory / position.name
        atomic_save(state, path)
        self._point(self.directory / "last.pth", path)
        if best:
            self._point(self.directory / "best.pth", path)
        self.prune()
        return path

    def _point(self, name: Path, path: Path) -> None:
        """Make `name` hold the bytes of series file `path`: a hard link, or a copy where there are none."""
        if self.links and atomic_link(path, name):
            return
        if self.links:
            self.links = False
            self.warn(f"{self.directory}: its filesystem has no hard links, so last.pth and best.pth are copies of "
                      "series checkpoints (twice the disk)")
        atomic_copy(path, name)

    def save_best(self, state: dict[str, Any]) -> None:
        """Write best.pth alone (an epoch that improved without a series checkpoint)."""
        atomic_save(state, self.directory / "best.pth")

    def prune(self) -> None:
        """Delete series checkpoints older than the newest `keep_last` (except the protected one), and temporary
        files that a crash in the middle of a write left behind."""
        for position, path in series(self.directory)[: -self.keep_last]:
            if position != self.protected:
                self._delete(path)
        for path in self.directory.iterdir():
            if _TEMP_NAME.match(path.name):
                self._delete(path)

    def set_aside_after(self, position: Position) -> None:
        """Rename series checkpoints newer than `position` (a run resumed from an older one abandons them) to
        ``<name>.superseded-<time>``, so the series continues from `position`."""
        for newer, path in series(self.directory):
            if newer > position:
                moved = set_aside(path, "superseded")
                self.warn(f"{path} is newer than the checkpoint resumed from ({position}): set aside as {moved.name}")

    def _delete(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            self.warn(f"could not delete old checkpoint file {path} ({err}); retrying at the next save")
