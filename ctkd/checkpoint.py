"""Checkpoints: verified atomic writes, the run directory's checkpoint series, plain-type contents readable with
``weights_only=True``, and teacher loading.

Our run checkpoints hold the trainable module (student, temperature module, method heads) and the method's state,
optimizer, LR schedule (and the position of a per-iteration warm-up/cosine schedule, ``lr_scheduler``), fp16's
GradScaler state (``grad_scaler``; None without fp16), epoch, best accuracy, RNG states, the resolved config, the
SHA-256 of the teacher file (``teacher_sha256``) and, for a checkpoint taken inside an epoch, the state that lets the
epoch continue exactly (``epoch_state``: the epoch, its steps done, its LR, every rank's running sums and flags).

Integrity: a file is written under a temporary name, fsynced, read back and checksummed; the SHA-256 of all its
bytes is stored in the file itself, as the zip archive comment that ends every torch.save file
(``ctkd-sha256:<64 hex digits>``; torch.load and any zip tool ignore it), then the file is fsynced and renamed into
place. Loading verifies the checksum whenever a file carries one, so a truncated, emptied or bit-flipped file is
reported as such (torch.load alone reads a flipped byte of tensor data silently). Files of checkpoint version ≤ 2
and of other tools carry none and are read as before.

The series (`CheckpointSeries`): ``ckpt-e<EEEE>-s<SSSSSS>.pth`` is the state after SSSSSS training steps of epoch
EEEE (an epoch-end checkpoint has all of that epoch's steps and its evaluation); the newest `keep_last` are kept;
``last.pth`` is the newest and ``best.pth`` the best-accuracy epoch's state: hard links to those series files (the same
bytes, no second copy on disk; copies on a filesystem without hard links).

Teacher files come in the layouts in circulation (docs/differences.md, Teacher loading): ``{"model": state_dict,
...}`` (CRD, mdistiller, CTKD CIFAR teachers), ``{"state_dict": ...}``, a bare state_dict, or one of our own run
checkpoints (``{"student": ...}``), possibly saved from DDP or ``torch.compile``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from ctkd.config import upgrade_saved_config
from ctkd.errors import UserError
from ctkd.fileio import atomic_copy, atomic_link, atomic_write

CHECKPOINT_FORMAT = "ctkd-run"
# 1: "student" and "temperature" states; 2: the whole trainable module and method state; 3: a SHA-256 in the file,
# "epoch_state" (checkpoints inside an epoch) and "teacher_sha256"
CHECKPOINT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_STATE_DICT_KEYS = ("student", "model", "state_dict")  # ours, CRD/mdistiller/CTKD, generic

_CHECKSUM_PREFIX = b"ctkd-sha256:"
_CHECKSUM_COMMENT = len(_CHECKSUM_PREFIX) + 64  # bytes of the zip comment holding the hex digest
_EOCD = b"PK\x05\x06"  # the zip end-of-central-directory record: 22 bytes, its last 2 the comment's length
_EOCD_SIZE = 22
_CHUNK = 1 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, unreadable or does not fit the model; the message names the file."""


# ---------------------------------------------------------------------------------------------- files
def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically with its SHA-256: write, fsync, checksum, fsync, rename."""

    def write(handle: IO[bytes]) -> None:
        torch.save(obj, handle)
        _append_checksum(handle)

    atomic_write(path, write)


def _append_checksum(handle: IO[bytes]) -> None:
    """Fsync what torch.save wrote, read it back, and store its SHA-256 as the zip archive comment."""
    handle.flush()
    os.fsync(handle.fileno())
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(size - _EOCD_SIZE, 0))
    end = handle.read(_EOCD_SIZE)
    if len(end) != _EOCD_SIZE or not end.startswith(_EOCD) or end[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end its file with an empty zip comment: no place for the checksum")
    digest = _sha256(handle, size - 2)  # every byte before the comment's length field
    handle.seek(size - 2)
    handle.write(_CHECKSUM_COMMENT.to_bytes(2, "little") + _CHECKSUM_PREFIX + digest.encode("ascii"))


def _sha256(handle: IO[bytes], length: int) -> str:
    """SHA-256 of the first `length` bytes of `handle`."""
    digest = hashlib.sha256()
    handle.seek(0)
    while length > 0:
        chunk = handle.read(min(_CHUNK, length))
        if not chunk:
            break
        digest.update(chunk)
        length -= len(chunk)
    return digest.hexdigest()


def stored_checksum(path: str | Path) -> str | None:
    """The SHA-256 stored in file `path` by `atomic_save`, or None if it carries none."""
    path = Path(path)
    size = path.stat().st_size
    tail_size = _EOCD_SIZE + _CHECKSUM_COMMENT
    if size < tail_size:
        return None
    with path.open("rb") as handle:
        handle.seek(size - tail_size)
        tail = handle.read(tail_size)
    comment = tail[_EOCD_SIZE:]
    if (not tail.startswith(_EOCD) or tail[_EOCD_SIZE - 2:_EOCD_SIZE] != _CHECKSUM_COMMENT.to_bytes(2, "little")
            or not comment.startswith(_CHECKSUM_PREFIX)):
        return None
    return comment[len(_CHECKSUM_PREFIX):].decode("ascii", errors="replace")


def verify_checksum(path: str | Path) -> bool:
    """Check file `path` against the SHA-256 stored in it: True if it matches, False if the file carries none
    (version ≤ 2 checkpoints, other tools' files); a mismatch raises a CheckpointError naming the file."""
    path = Path(path)
    stored = stored_checksum(path)
    if stored is None:
        return False
    with path.open("rb") as handle:
        actual = _sha256(handle, path.stat().st_size - _CHECKSUM_COMMENT - 2)
    if actual != stored:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: SHA-256 checksum mismatch (stored {stored[:16]}…, "
            f"its bytes give {actual[:16]}…)"
        )
    return True


def load_file(path: str | Path, *, extra_safe_globals: tuple[type, ...] = (), verify: bool = True) -> Any:
    """torch.load to CPU with ``weights_only=True``, after verifying the file's checksum if it carries one (unless
    `verify` is False); failures become a CheckpointError naming the file and cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted (empty: 0 bytes)")
    if verify:
        verify_checksum(path)
    if not _looks_like_torch_save(path):
        raise CheckpointError(
            f"not a checkpoint (or damaged): {path} is not a file written by torch.save (neither its zip format nor "
            "the legacy one)"
        )
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} holds Python objects that are not plain data{what} and is not loaded for safety: "
            "only tensors, numbers, strings and containers of them are read. Save the weights alone "
            "(torch.save(model.state_dict(), PATH)) from the code that wrote it"
        ) from err
    except PermissionError as err:
        raise CheckpointError(f"checkpoint {path} is not readable: {err}") from err
    except Exception as err:  # noqa: BLE001 - a damaged file fails inside torch.load in many ways (OSError: past the end)
        reason = " ".join((str(err).strip() or type(err).__name__).split())[:200]
        raise CheckpointError(f"not a checkpoint (or damaged): {path} is truncated or corrupted ({reason})") from err


def _looks_like_torch_save(path: Path) -> bool:
    """Whether the file starts like a torch.save file: a zip archive (its format since torch 1.6) or a pickle (the
    legacy format, protocol 2 or higher)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states as plain types (lists, ints, tensors) for weights_only loading."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this process's device only: a resume may see another number of GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- run checkpoints
def load_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our run checkpoints: verify its checksum, check its format and version, upgrade it to today's."""
    path = Path(path)
    checksummed = path.is_file() and path.stat().st_size > 0 and verify_checksum(path)
    state = load_file(path, verify=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a ctkd run checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry); "
            "--resume takes a checkpoint of a ctkd run (last.pth, best.pth, ckpt-*.pth)"
        )
    version = state.get("version")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise CheckpointError(f"{path}: unsupported checkpoint version {version} (supported: {supported})")
    if version >= 3 and not checksummed:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: its SHA-256 checksum is missing")
    if version == 1:
        state = _upgrade_from_version_1(state)
    if state["version"] == 2:
        state = {**state, "version": 3, "epoch_state": None, "teacher_sha256": None}
    if isinstance(state.get("config"), dict):
        state["config"] = upgrade_saved_config(state["config"])
    return state


# ---------------------------------------------------------------------------------------------- the series
_SERIES_NAME = re.compile(r"^ckpt-e(\d{4,})-s(\d{6,})\.pth$")
_TEMP_NAME = re.compile(r"^\.(ckpt-e\d+-s\d+\.pth|last\.pth|best\.pth)\..+\.tmp$")


@dataclass(frozen=True, order=True)
class Position:
    """Where a checkpoint stands: after `step` training steps of epoch `epoch` (1-based)."""

    epoch: int
    step: int

    @property
    def name(self) -> str:
        """The file name of the series checkpoint at this position."""
        return f"ckpt-e{self.epoch:04d}-s{self.step:06d}.pth"

    def __str__(self) -> str:
        return f"epoch {self.epoch}, step {self.step}"


def state_position(state: Mapping[str, Any], steps_per_epoch: int) -> Position:
    """The position of a loaded run checkpoint: inside its epoch_state's epoch, or at the end of epoch `epoch`."""
    inside = state.get("epoch_state")
    if inside is not None:
        return Position(int(inside["epoch"]), int(inside["step"]))
    return Position(int(state["epoch"]), steps_per_epoch)


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


def _upgrade_from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint (separate student and temperature states, methods vanilla and kd only) as version 2."""
    trainable = {f"student.{key}": value for key, value in state.pop("student").items()}
    trainable.update({f"temperature.{key}": value for key, value in state.pop("temperature").items()})
    return {**state, "version": 2, "trainable": trainable, "method_state": {}}


# ---------------------------------------------------------------------------------------------- model weights
def extract_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded file of any supported layout, with wrapper prefixes stripped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("trainable"), Mapping):  # our run checkpoint: the student
        obj = {key[len("student."):]: value for key, value in obj["trainable"].items() if key.startswith("student.")}
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: no model weights found; expected a state_dict, or a dict with one of "
            f"{list(_STATE_DICT_KEYS)} holding it (found {found})"
        )
    return {_strip_prefixes(key): value for key, value in obj.items()}


def _strip_prefixes(key: str) -> str:
    """Remove leading 'module.' / '_orig_mod.' (possibly nested) left by DDP and torch.compile."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def load_weights_strict(
    model: nn.Module,
    path: str | Path,
    *,
    arch: str,
    key: str = "student.name",
    identify: Callable[[dict[str, torch.Tensor]], list[str]] | None = None,
) -> None:
    """Load the weights of the file at `path` into `model` strictly; a mismatch names missing/unexpected keys.

    `identify`, given the file's state_dict, returns the architectures it matches; the error then says which config
    `key` to set to which of them.
    """
    state = extract_state_dict(load_file(path, extra_safe_globals=(argparse.Namespace,)), path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(_mismatch_message(path, arch, key, missing, unexpected, wrong_shape, identify, state))
    model.load_state_dict(state, strict=True)


def _mismatch_message(
    path: str | Path,
    arch: str,
    key: str,
    missing: list[str],
    unexpected: list[str],
    wrong_shape: list[str],
    identify: Callable[[dict[str, torch.Tensor]], list[str]] | None,
    state: dict[str, torch.Tensor],
) -> str:
    """A readable account of why a file does not fit architecture `arch`."""

    def listing(title: str, items: list[str]) -> str:
        shown = ", ".join(items[:8]) + (f", … ({len(items)} in all)" if len(items) > 8 else "")
        return f"\n  {title}: {shown}" if items else ""

    message = (
        f"{path} does not match architecture '{arch}'"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", wrong_shape)
    )
    matches = identify(state) if identify is not None else []
    if matches:
        message += f"\n  The file matches architecture(s): {', '.join(matches)}; set {key}={matches[0]}"
        if len(matches) > 1:
            message += f" (or {' / '.join(matches[1:])})"
    return message
