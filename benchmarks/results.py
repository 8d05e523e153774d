"""What the benchmark measures and reports: a timed window, a row of the main table, and the report's parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FIXED_TAU_LABEL = "d: KD, fixed τ"  # the row variant d's costs are taken against
Table = tuple[str, list[str], list[list[str]]]  # title, headers, rows of a table after the main one


@dataclass
class Timing:
    """One timed window: steps, images, seconds, peak memory and what else the run found out."""

    steps: int
    images: int
    seconds: float
    peak_bytes: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Throughput over the window."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def step_ms(self) -> float:
        """Mean wall time of a step, in milliseconds."""
        return 1000.0 * self.seconds / self.steps if self.steps else float("nan")


@dataclass
class Row:
    """A row of the main table: a variant of a pair and its measurement."""

    pair: str
    variant: str
    label: str
    settings: str
    timing: Timing
    bf16: bool = False
    relative: str = ""


@dataclass
class Report:
    """Everything printed and appended: header lines and the tables in order."""

    header: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    extra_tables: list[Table] = field(default_factory=list)
