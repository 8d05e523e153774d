"""What a table's runs left behind, cell by cell: the finished seeds' results, every seed's epoch records, the
settings in which they differ from the table, their mean ± std, and the paper's number beside them."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctkd.errors import UserError
from ctkd.runs import RunFileError, config_value, inspect_run, read_config, read_metrics, read_results
from ctkd.tables import Cell, Table, mean_std, paper_value, run_dir


@dataclass
class CellRuns:
    """What the runs of one cell left behind: results of the finished seeds, epoch records of every seed."""

    cell: Cell
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed → results.json of a finished run
    records: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # seed → metrics.jsonl (any run)
    learned_tau: bool = False  # whether any of its runs learns τ (the CTKD runs of the temperature figure)
    # (key, the runs' value, the table's) of every experiment key in which a finished run differs from the table
    differences: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def other_settings(self) -> bool:
        """Whether a finished run of the cell was trained under other settings than the table's."""
        return bool(self.differences)


@dataclass(frozen=True)
class Stat:
    """One metric of one cell over the finished seeds."""

    mean: float | None
    std: float | None  # None with fewer than two finished seeds: a sample std needs two
    n: int
    total: int


@dataclass(frozen=True)
class Paper:
    """The paper's number of a cell (std only for the cells printed as mean ± std)."""

    mean: float | None = None
    std: float | None = None


def number_or_none(value: Any) -> float | None:
    """`value` as a float when it is a number (bools and junk become None)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cell_plan(cell: Cell, seed: int, problems: list[str]) -> dict[str, Any] | None:
    """The experiment the table asks of a cell's seed (its config, its overrides and the seed), as plain dicts;
    None (with the reason in `problems`) when its config cannot be read (a table whose configs moved)."""
    from ctkd.config import config_to_dict, load_config  # imports the components' options (torch): only here

    try:
        cfg = load_config(cell.config, (*cell.overrides, f"seed={seed}"))
    except (UserError, OSError) as err:
        problems.append(f"cells.{cell.row}.{cell.column}: its runs are not compared with the table's setting ({err})")
        return None
    return config_to_dict(cfg)


def _learns_tau(path: Path, records: list[dict[str, Any]]) -> bool:
    """Whether the run learns τ: from config.yaml when present, else from whether its logged τ changes."""
    try:
        config = read_config(path)
    except RunFileError:
        taus = {record.get("tau_last") for record in records if number_or_none(record.get("tau_last")) is not None}
        return len(taus) > 1
    # a validated config only has a teacher when it distils; temperature.name defaults to global (learned)
    return bool(config_value(config, "teacher.name")) and config_value(config, "temperature.name") != "fixed"


def collect_cell(table: Table, cell: Cell, root: Path, problems: list[str]) -> CellRuns:
    """Read the run directory of each seed of `cell`; damaged files are reported in `problems` and skipped."""
    found = CellRuns(cell)
    for seed in table.seeds:
        path = run_dir(table, cell, seed, root)
        if not path.is_dir():
            continue
        try:
            records = read_metrics(path)
        except RunFileError as err:
            problems.append(f"{path}: {err}")
            records = []
        if records:
            found.records[seed] = records
            found.learned_tau = found.learned_tau or _learns_tau(path, records)
        status = inspect_run(path, cell_plan(cell, seed, problems))
        if status.state == "done":
            try:
                found.results[seed] = read_results(path) or {}
            except RunFileError as err:  # inspect_run said no for a damaged file; kept for a race with a writer
                problems.append(f"{path}: {err}")
                continue
            found.differences += [d for d in status.differences if d not in found.differences]
    return found


def cell_stat(runs: CellRuns, metric: str, total: int) -> Stat:
    """Mean and sample std of `metric` over the finished seeds that report it."""
    values = [v for r in runs.results.values() if (v := number_or_none(r.get(metric))) is not None]
    if not values:
        return Stat(None, None, 0, total)
    mean, std = mean_std(values)
    return Stat(mean, std if len(values) > 1 else None, len(values), total)


def load_paper_results(path: Path) -> dict[str, Any]:
    """The paper's numbers (docs/paper_results.yaml; {} when it is missing: the tables are still built without)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        print(f"make_table.py: warning: cannot read {path} ({err}); the paper column stays empty", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def cell_paper(table: Table, cell: Cell, paper_results: dict[str, Any]) -> Paper:
    """The paper's number of a cell: a plain number, a {mean, std} cell or the top1 of a {top1, top5} cell."""
    value = paper_value(table, cell, paper_results)
    if isinstance(value, dict):
        if "mean" in value:
            return Paper(number_or_none(value.get("mean")), number_or_none(value.get("std")))
        return Paper(number_or_none(value.get("top1")))
    return Paper(number_or_none(value))


def delta(stat: Stat, paper: Paper) -> float | None:
    """Ours − paper, when both are known."""
    return None if stat.mean is None or paper.mean is None else stat.mean - paper.mean


def report_missing(table: Table, cells: dict[tuple[str, str], CellRuns]) -> str:
    """One line: how many cells have no finished seed and how many are partly finished."""
    total = len(table.seeds)
    empty = sum(1 for runs in cells.values() if not runs.results)
    partial = sum(1 for runs in cells.values() if 0 < len(runs.results) < total)
    return (f"{len(cells) - empty - partial} of {len(cells)} cells complete; {partial} partly finished; "
            f"{empty} with no finished seed (missing runs)")
