"""Our run checkpoints: what they hold, their format versions, and the RNG states they carry.

A run checkpoint holds the trainable module (student, temperature module, method heads) and the method's state,
optimizer, LR schedule (and the position of a per-iteration warm-up/cosine schedule, ``lr_scheduler``), fp16's
GradScaler state (``grad_scaler``; None without fp16), epoch, best accuracy, RNG states, the resolved config, the
SHA-256 of the teacher file (``teacher_sha256``) and, for a checkpoint taken inside an epoch, the state that lets the
epoch continue exactly (``epoch_state``: the epoch, its steps done, its LR, every rank's running sums and flags) and,
for a method with initialisation stages, their progress (``stages``: ctkd.stages; None otherwise, and absent from
files written before stages existed).
Files of earlier versions are upgraded on load. Integrity: ctkd/integrity.py; the series of a run: ctkd/series.py.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctkd.config import upgrade_saved_config
from ctkd.integrity import CheckpointError, load_file, verify_checksum

CHECKPOINT_FORMAT = "ctkd-run"
# 1: "student" and "temperature" states; 2: the whole trainable module and method state; 3: a SHA-256 in the file,
# "epoch_state" (checkpoints inside an epoch) and "teacher_sha256"
CHECKPOINT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)


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


def _upgrade_from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint (separate student and temperature states, methods vanilla and kd only) as version 2."""
    trainable = {f"student.{key}": value for key, value in state.pop("student").items()}
    trainable.update({f"temperature.{key}": value for key, value in state.pop("temperature").items()})
    return {**state, "version": 2, "trainable": trainable, "method_state": {}}
