"""Counter-based hashing: random numbers that are a pure function of (seed, epoch, index).

Data randomness (crop offsets, flips, epoch permutations) is derived from these hashes instead of a stateful
RNG, so it does not depend on which worker handles a sample, on how samples are batched, or on the global
torch RNG; a resumed run and runs with any number of workers see identical data (augmentation drawn from a worker's
own RNG makes a resumed run diverge).
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: makes a zero input hash to a non-zero value
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _as_int64(value: int) -> int:
    """The int64 (two's complement) with the same 64 bits as the unsigned `value`."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_logical(x: Tensor, bits: int) -> Tensor:
    """Unsigned right shift of int64 bit patterns (torch's `>>` is arithmetic, i.e. copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser applied element-wise to an int64 tensor holding unsigned 64-bit patterns.

    torch's int64 add/multiply wrap modulo 2**64 (pinned against a pure-Python reference in the tests), which
    is exactly the unsigned arithmetic the algorithm needs.
    """
    z = x + _as_int64(_GOLDEN_GAMMA)
    z = (z ^ _shift_right_logical(z, 30)) * _as_int64(_MUL1)
    z = (z ^ _shift_right_logical(z, 27)) * _as_int64(_MUL2)
    return z ^ _shift_right_logical(z, 31)


def hash_keys(seed: int, epoch: int, indices: Tensor) -> Tensor:
    """One 64-bit hash (int64 bit pattern) per entry of `indices`, a pure function of (seed, epoch, index).

    The three inputs are chained through the mixer (rather than summed) so that, e.g., (epoch 1, index 0)
    and (epoch 0, index 1) give unrelated values.
    """
    # (seed, epoch) mix on the host: a 0-d CPU tensor enters a GPU op as a scalar, with no copy or sync
    h = splitmix64(torch.tensor(_as_int64(seed), dtype=torch.int64))
    h = splitmix64(h ^ _as_int64(epoch))
    return splitmix64(h ^ indices.to(torch.int64))


def seed_for(seed: int, epoch: int) -> int:
    """A non-negative 63-bit seed for a torch.Generator, mixed from (seed, epoch)."""
    # index -1 belongs to no sample, so this seed is unrelated to every sample's augmentation hash
    key = hash_keys(seed, epoch, torch.full((1,), -1, dtype=torch.int64))
    return int(key.item()) & ((1 << 63) - 1)
