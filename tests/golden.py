"""Reference values of the authors' code, kept under tests/data (provenance: tests/data/README.md).

- `zoo()`: per architecture of the authors' model zoo, the ordered state_dict layout, parameter count, feature shapes.
- `reference_state_dict(name)` and `reference_input()`: deterministic weights and a fixed batch. Loaded into the
  authors' model, they produce `reference_logits(name, mode)`; a model of ours that loads the same weights strictly and
  returns the same logits computes the same function.
- `loss_inputs()` and `reference_loss(name)`: fixed logits, targets, per-sample τ and features, and the value the
  authors' loss code returned on them.
"""
from __future__ import annotations

import json
import zlib
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

DATA = Path(__file__).resolve().parent / "data"


@cache
def _load(name: str) -> dict:
    """One JSON file of tests/data, parsed once."""
    return json.loads((DATA / name).read_text())


@cache
def zoo() -> dict[str, dict]:
    """tests/data/zoo.json with each state_dict entry expanded to [key, shape, dtype] (float32 is left implicit)."""
    entries = {}
    for name, entry in _load("zoo.json").items():
        layout = [[key, shape, rest[0] if rest else "float32"] for key, shape, *rest in entry["state_dict"]]
        entries[name] = {**entry, "state_dict": layout}
    return entries


def architectures() -> list[str]:
    """Names of the architectures whose logits were recorded (the paper's CIFAR zoo), sorted."""
    return sorted(_load("golden_logits.json")["logits"])


def _generator(key: str) -> torch.Generator:
    """A CPU generator seeded by the CRC-32 of a state_dict key, so each tensor's values depend on its key alone."""
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _reference_tensor(key: str, shape: list[int]) -> Tensor:
    """The deterministic value of one state_dict entry; the recipe is fixed (the recorded logits depend on it)."""
    g = _generator(key)
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.long)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if key.endswith("running_var"):
        return 1.0 + 0.5 * torch.rand(shape, generator=g)  # positive, near 1
    if len(shape) >= 2:  # conv / linear weights, He-scaled by their fan-in
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        return torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    if key.endswith("weight"):  # BN scale
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)  # biases and BN shifts


def reference_state_dict(name: str) -> dict[str, Tensor]:
    """Deterministic weights for architecture `name`, in the authors' key order."""
    return {key: _reference_tensor(key, shape) for key, shape, _ in zoo()[name]["state_dict"]}


def reference_input() -> Tensor:
    """The fixed input batch the reference logits were computed on: (2, 3, 32, 32)."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def reference_logits(name: str, mode: str = "eval") -> Tensor:
    """The authors' logits for `name` on `reference_input()` in `mode`: 'eval', or 'train' (BN on batch statistics)."""
    return torch.tensor(_load("golden_logits.json")["logits"][name][mode])


def _seeded_randn(seed: int, *shape: int, scale: float = 1.0) -> Tensor:
    """Standard-normal values from a generator seeded with `seed`, times `scale`."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def loss_inputs() -> dict[str, Tensor]:
    """Fixed inputs of the reference losses: logits (16, 100), targets (16,), per-sample τ in (1, 21) (16,),
    pooled features (16, 64) / (16, 256) (PKT) and feature maps (16, 64, 8, 8) / (16, 256, 8, 8) (SP)."""
    batch, classes = 16, 100
    return {
        "student_logits": _seeded_randn(1, batch, classes, scale=3.0),
        "teacher_logits": _seeded_randn(2, batch, classes, scale=4.0),
        "targets": torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(3)),
        "tau_per_sample": 1 + 20 * torch.sigmoid(_seeded_randn(4, batch)),
        "feat_student": _seeded_randn(5, batch, 64),
        "feat_teacher": _seeded_randn(6, batch, 256),
        "map_student": _seeded_randn(7, batch, 64, 8, 8),
        "map_teacher": _seeded_randn(8, batch, 256, 8, 8),
    }


def reference_loss(name: str) -> float:
    """The authors' value of loss `name` on `loss_inputs()`: `kd_T1.0`, `kd_T4.0`, `kd_T15.62`, `kd_instance`
    (per-sample τ), `dkd_a{α}_b{β}_T{T}` (three settings), `pkt`, `sp`."""
    return _load("golden_losses.json")["values"][name]


def reference_losses() -> list[str]:
    """Names of the recorded loss values."""
    return sorted(_load("golden_losses.json")["values"])
