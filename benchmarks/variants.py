"""The variants a to d of one teacher → student pair, as the entries that the rounds measure."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.ctkd_loop import ctkd_config, describe, measure_ctkd
from benchmarks.data import Data
from benchmarks.fastest import Search, fastest_cpu, fastest_cuda
from benchmarks.reference_loop import run_reference
from benchmarks.results import FIXED_TAU_LABEL, Table, Timing
from benchmarks.rounds import Entry
from ctkd.config import Config

# variant d: the temperature section of each row, and the row's label
TEMPERATURES = (("fixed", FIXED_TAU_LABEL), ("global", "d: CTKD, global τ"), ("instance", "d: CTKD, instance τ"))


@dataclass
class Pair:
    """One teacher → student pair, with what every variant of it needs: its teacher file, the data and options."""

    teacher: str
    student: str
    teacher_file: Path
    data: Data
    args: argparse.Namespace
    device: torch.device

    @property
    def name(self) -> str:
        """The pair as the tables name it."""
        return f"{self.teacher} → {self.student}"

    def config(self, extra: Sequence[str]) -> Config:
        """This pair's config with `extra` overrides."""
        return ctkd_config(self.teacher, self.student, self.teacher_file, self.args, self.device, extra)


def reference_entry(pair: Pair) -> Entry:
    """Variant a: the authors'-style loop."""
    return Entry(
        "a", "a: reference loop",
        lambda: run_reference(pair.teacher, pair.student, pair.data, pair.teacher_file, pair.args, pair.device),
        lambda _: f"PIL per-image transforms, {pair.args.workers} workers, fp32, torch SGD (default implementation), "
                  "loss.item() every step",
    )


def ctkd_entry(pair: Pair, variant: str, label: str, extra: Sequence[str], settings: str | None = None) -> Entry:
    """An entry measuring ctkd with `extra` overrides (settings: described from the config unless given)."""
    cfg, args, device = pair.config(extra), pair.args, pair.device
    return Entry(variant, label, lambda: measure_ctkd(cfg, device, args.warmup, args.steps),
                 lambda timing: settings or describe(cfg, timing, device),
                 bf16=cfg.runtime.amp == "bf16")


def candidates_table(pair: Pair, tried: list[tuple[str, Timing | str]]) -> Table:
    """Variant c's search: every candidate tried and its throughput (or why it failed)."""
    kind = "full measurements" if pair.device.type == "cuda" else f"trials of {pair.args.trial_steps} steps"
    return (
        f"Variant c candidates, {pair.name} ({kind}; the fastest is then measured in the rounds of the main table)",
        ["overrides", "images/s", "step (ms)"],
        [[o, f"{t.images_per_s:,.1f}", f"{t.step_ms:,.2f}"] if isinstance(t, Timing) else [o, t, ""]
         for o, t in tried],
    )


def fastest_entry(pair: Pair, tables: list[Table]) -> tuple[Entry, list[str]]:
    """Variant c: searched now (its candidates added to `tables`), measured in the rounds; also its overrides."""
    search = fastest_cuda if pair.device.type == "cuda" else fastest_cpu
    found: Search = search(pair.config, pair.args, pair.device)
    chosen, _, tried = found
    tables.append(candidates_table(pair, tried))
    return ctkd_entry(pair, "c", "c: ctkd fastest", chosen), chosen


def temperature_entries(pair: Pair) -> list[Entry]:
    """Variant d: KD with a fixed τ against CTKD with a global and an instance-wise τ, all with ctkd defaults."""
    return [
        # the whole section replaced (each temperature reads only its own keys); a fixed τ has no curriculum, whose
        # section must then be the default one
        ctkd_entry(pair, "d", label, [f"temperature={name}"] + (["curriculum=cosine"] if name == "fixed" else []),
                   f"ctkd defaults, temperature={name}")
        for name, label in TEMPERATURES
    ]


def pair_entries(pair: Pair, tables: list[Table]) -> tuple[list[Entry], list[str]]:
    """The entries of every variant asked for, in order, and the overrides chosen for variant c (if run)."""
    variants = pair.args.variants.split(",")
    entries: list[Entry] = []
    chosen: list[str] = []
    if "a" in variants:
        entries.append(reference_entry(pair))
    if "b" in variants:
        entries.append(ctkd_entry(pair, "b", "b: ctkd defaults", []))
    if "c" in variants:
        entry, chosen = fastest_entry(pair, tables)
        entries.append(entry)
    if "d" in variants:
        entries += temperature_entries(pair)
    return entries, chosen
