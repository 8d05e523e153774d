"""Model weights in the layouts in circulation (docs/differences.md, Teacher loading), loaded strictly.

``{"model": state_dict, ...}`` (CRD, mdistiller, CTKD CIFAR teachers), ``{"state_dict": ...}``, a bare state_dict,
or one of our own run checkpoints (the student of its trainable module), possibly saved from DDP or torch.compile;
a mismatch names the missing and unexpected keys and the architectures the file does match.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctkd.integrity import CheckpointError, load_file

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_STATE_DICT_KEYS = ("student", "model", "state_dict")  # ours, CRD/mdistiller/CTKD, generic


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
