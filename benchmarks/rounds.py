"""Rounds: every variant measured several times, alternating, and reported as its median round."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from benchmarks.device import release
from benchmarks.results import Report, Row, Timing


@dataclass
class Entry:
    """A variant to measure in every round: how to measure it once, and how to describe its settings."""

    variant: str
    label: str
    measure: Callable[[], Timing]
    settings: Callable[[Timing], str]
    bf16: bool = False
    timings: list[Timing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self) -> Timing:
        """The median round by throughput (the lower middle of an even count), with every round's images/s."""
        ordered = sorted(self.timings, key=lambda t: t.images_per_s)
        middle = ordered[(len(ordered) - 1) // 2]
        middle.info["rounds"] = [t.images_per_s for t in self.timings]
        middle.peak_bytes = max(t.peak_bytes for t in self.timings)  # the memory a run needs: the largest round's
        return middle


def measure_rounds(entries: Sequence[Entry], rounds: int, device: torch.device) -> None:
    """Measure every entry `rounds` times, alternating, so that a shared machine's slow spell costs every variant."""
    for number in range(1, rounds + 1):
        if rounds > 1:
            print(f"  round {number} of {rounds}", file=sys.stderr, flush=True)
        for entry in entries:
            try:
                timing = entry.measure()
            except Exception as err:  # noqa: BLE001 - e.g. out of memory under one setting: the others still count
                entry.errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}")
                print(f"  {entry.label}: failed: {entry.errors[-1]}", file=sys.stderr, flush=True)
                continue
            finally:
                release(device)
            entry.timings.append(timing)
            print(f"  {entry.label}: {timing.images_per_s:,.1f} images/s", file=sys.stderr, flush=True)


def record(report: Report, pair: str, entries: Sequence[Entry], rounds: int) -> None:
    """Each measured entry's median round as a row of `report`, and a header line for any failed round."""
    for entry in entries:
        if entry.timings:
            timing = entry.median()
            report.rows.append(Row(pair, entry.variant, entry.label, entry.settings(timing), timing, entry.bf16))
        if entry.errors:
            report.header.append(f"{pair}, {entry.label}: {len(entry.errors)} of {rounds} round(s) failed "
                                 f"({entry.errors[0]})")
