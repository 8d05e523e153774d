"""Checkpoints: atomic writes, plain-type contents readable with ``weights_only=True``, and teacher loading.

Our run checkpoints (`last.pth`, `best.pth`) hold the student, the temperature module, optimizer, LR schedule (and
the position of a per-iteration warm-up/cosine schedule, ``lr_scheduler``), fp16's GradScaler state
(``grad_scaler``; None without fp16), epoch, best accuracy, RNG states and the resolved config. Teacher files come
in the layouts in circulation (docs/differences.md, Teacher loading): ``{"model": state_dict, ...}`` (CRD,
mdistiller, CTKD CIFAR teachers), ``{"state_dict": ...}``, a bare state_dict, or one of our own run checkpoints
(``{"student": ...}``), possibly saved from DDP or ``torch.compile``.
"""
from __future__ import annotations

import argparse
import pickle
import random
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctkd.errors import UserError
from ctkd.fileio import atomic_write

CHECKPOINT_FORMAT = "ctkd-run"
CHECKPOINT_VERSION = 2  # 1: "student" and "temperature" states; 2: the whole trainable module and method state
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_STATE_DICT_KEYS = ("student", "model", "state_dict")  # ours, CRD/mdistiller/CTKD, generic


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, unreadable or does not fit the model; the message names the file."""


# ---------------------------------------------------------------------------------------------- files
def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (see ctkd.fileio)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def load_file(path: str | Path, *, extra_safe_globals: tuple[type, ...] = ()) -> Any:
    """torch.load to CPU with ``weights_only=True``; failures become a CheckpointError naming the file and cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} holds Python objects that are not plain data and is not loaded for safety: {err}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).strip() or type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({reason})") from err


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
    """Load one of our run checkpoints and check its format and version."""
    state = load_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a ctkd run checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry); "
            "--resume takes the last.pth or best.pth of a ctkd run"
        )
    if state.get("version") == 1:
        state = _upgrade_from_version_1(state)
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint version {state.get('version')} (supported: 1, {CHECKPOINT_VERSION})"
        )
    if isinstance(state.get("config"), dict):
        state["config"] = _upgrade_config(state["config"])
    return state


def _upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config of an earlier schema in today's: synthetic's keys moved from data.synthetic to data."""
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("synthetic"), dict):
        data = {k: v for k, v in data.items() if k != "synthetic"}
        if data.get("name") == "synthetic":
            data.update(config["data"]["synthetic"])
        config = {**config, "data": data}
    return config


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
