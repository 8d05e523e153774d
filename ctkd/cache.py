"""A small on-disk cache of results that are costly to compute and fully determined by their inputs: the test
accuracy of a teacher file, which every run of a table would otherwise evaluate again at start-up.

Entries live in ``$CTKD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ctkd``, i.e. ``~/.cache/ctkd``), one JSON file per
key (the SHA-256 of the inputs that determine the value), written atomically, so concurrent runs never corrupt one
another's entries. A missing, unreadable or damaged entry is simply computed again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ctkd.fileio import atomic_write_text

CACHE_ENV = "CTKD_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder: $CTKD_CACHE_DIR, else $XDG_CACHE_HOME/ctkd, else ~/.cache/ctkd."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctkd"


def cache_key(kind: str, inputs: dict[str, Any]) -> str:
    """The SHA-256 of `kind` and the JSON of `inputs` (keys sorted): equal inputs, equal key."""
    text = json.dumps({"kind": kind, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _path(kind: str, key: str) -> Path:
    return cache_dir() / kind / f"{key}.json"


def read_cached(kind: str, key: str) -> dict[str, Any] | None:
    """The value stored under `key`, or None when there is none (or it cannot be read)."""
    try:
        entry = json.loads(_path(kind, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry.get("value") if isinstance(entry, dict) and isinstance(entry.get("value"), dict) else None


def write_cached(kind: str, key: str, value: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Store `value` under `key` (with the inputs it was computed from, for a reader); never fails a run."""
    try:
        atomic_write_text(_path(kind, key), json.dumps({"inputs": inputs, "value": value}, sort_keys=True,
                                                       default=str, indent=1))
    except OSError:
        pass  # a read-only or full cache folder: the value is computed again next time
