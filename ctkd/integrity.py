"""Checkpoint files that can be trusted: verified atomic writes and loads of plain data only.

A file is written under a temporary name, fsynced, read back and checksummed; the SHA-256 of all its bytes is stored
in the file itself, as the zip archive comment that ends every torch.save file (``ctkd-sha256:<64 hex digits>``;
torch.load and any zip tool ignore it), then the file is fsynced and renamed into place. Loading verifies the
checksum whenever a file carries one, so a truncated, emptied or bit-flipped file is reported as such (torch.load
alone reads a flipped byte of tensor data silently); files of checkpoint version ≤ 2 and of other tools carry none
and are read as before. Every file is read with ``weights_only=True``: plain data, never code.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any

import torch

from ctkd.errors import UserError
from ctkd.fileio import atomic_write

_CHECKSUM_PREFIX = b"ctkd-sha256:"
_CHECKSUM_COMMENT = len(_CHECKSUM_PREFIX) + 64  # bytes of the zip comment holding the hex digest
_EOCD = b"PK\x05\x06"  # the zip end-of-central-directory record: 22 bytes, its last 2 the comment's length
_EOCD_SIZE = 22
_CHUNK = 1 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, unreadable or does not fit the model; the message names the file."""


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
