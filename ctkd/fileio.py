"""Atomic file writes: a temporary file beside the target, fsync, then a rename over the target.

A crash at any instant leaves either the old file or the new one under the target name, never a partial file (a
crash before the rename can leave the temporary file, `.<name>.<random>.tmp`, beside it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace `path` with what `write` writes into the binary handle it is given.

    The handle is opened for reading too (``w+b``), so `write` may read back what it wrote (ctkd.integrity does, to
    checksum the bytes) before the file is fsynced and renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _default_file_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Create or replace `path` with a byte-for-byte copy of the file `source`."""
    with open(source, "rb") as src:
        atomic_write(path, lambda handle: shutil.copyfileobj(src, handle, 1 << 20))


def atomic_link(source: str | Path, path: str | Path) -> bool:
    """Create or replace `path` with a hard link to the file `source` (the same bytes, no second copy on disk),
    atomically: linked under a temporary name, then renamed. False, with nothing changed, where the filesystem has
    no hard links (the caller then copies)."""
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return True


def supports_hard_links(directory: str | Path) -> bool:
    """Whether files in `directory` can be hard-linked (probed with an empty file, removed again)."""
    directory = Path(directory)
    fd, probe = tempfile.mkstemp(prefix=".link-test-", dir=directory)
    os.close(fd)
    try:
        os.link(probe, f"{probe}.2")
    except OSError:
        return False
    else:
        os.unlink(f"{probe}.2")
        return True
    finally:
        os.unlink(probe)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Create or replace `path` with UTF-8 `text`."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _default_file_mode() -> int:
    """0666 minus the process umask: the mode open() would have given a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Persist the rename: fsync the directory entry (skipped where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
