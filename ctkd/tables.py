"""Table files (configs/tables/<name>.yaml, see docs/tables.md): reading, run directories, paper values, run states.

Only yaml and the standard library are used here, so the table scripts start quickly and never import torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctkd.errors import UserError

TABLES_DIR = Path("configs/tables")
DEFAULT_RUNS_ROOT = "runs"
METRICS: tuple[str, ...] = ("best_acc1", "last_acc1")
TOP_LEVEL_KEYS: tuple[str, ...] = ("title", "paper_table", "metric", "seeds", "teachers", "rows", "columns", "cells")
CELL_KEYS: tuple[str, ...] = ("config", "overrides", "paper")


class TableError(UserError, ValueError):
    """A table file that is missing or does not follow docs/tables.md."""


@dataclass(frozen=True)
class Cell:
    """One experiment of a table: a config plus overrides, run once per seed."""

    row: str
    column: str
    config: str
    overrides: tuple[str, ...] = ()
    paper_path: tuple[Any, ...] | None = None  # None: the default [paper_table, row, column]


@dataclass(frozen=True)
class Table:
    """A validated table file."""

    name: str  # the file's stem: the folder of its runs below <runs-root>/tables/
    title: str
    paper_table: str | None
    metric: str
    seeds: tuple[int, ...]
    teachers: dict[str, str]
    rows: dict[str, str]
    columns: dict[str, str]
    cells: dict[tuple[str, str], Cell]
    path: Path | None = None

    def ordered_cells(self) -> list[Cell]:
        """The cells in table order: rows as declared, then columns as declared (missing cells left out)."""
        return [self.cells[(r, c)] for r in self.rows for c in self.columns if (r, c) in self.cells]

    def runs(self, seeds: tuple[int, ...] | list[int] | None = None) -> list[tuple[Cell, int]]:
        """Every (cell, seed) in table order, seeds innermost; the index in this list is the run's array index."""
        chosen = tuple(self.seeds if seeds is None else seeds)
        return [(cell, seed) for cell in self.ordered_cells() for seed in chosen]


def find_table(name_or_path: str | Path) -> Path:
    """The table file named by a path, or by its name in configs/tables ('cifar_kd')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = TABLES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in TABLES_DIR.glob("*.yaml")) if TABLES_DIR.is_dir() else []
    hint = f"; tables in {TABLES_DIR}: {', '.join(known)}" if known else ""
    raise TableError(f"no table file '{name_or_path}' (neither a file nor {candidate}){hint}")


def _fail(path: Path, key: str, message: str) -> TableError:
    """A TableError naming the file and the dotted key."""
    return TableError(f"{path}: {key}: {message}" if key else f"{path}: {message}")


def _is_int(value: Any) -> bool:
    """Whether `value` is an int (YAML booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _string_map(path: Path, key: str, value: Any, required: bool) -> dict[str, str]:
    """A mapping of string keys to string values (rows, columns, teachers)."""
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping) or (required and not value):
        raise _fail(path, key, f"must be a non-empty mapping of key → text, got {value!r}")
    result = {}
    for item_key, item_value in value.items():
        if not isinstance(item_key, str):
            raise _fail(path, f"{key}.{item_key}", "keys must be text (quote it)")
        if item_value is None or isinstance(item_value, (Mapping, list)):
            raise _fail(path, f"{key}.{item_key}", f"must be text, got {item_value!r}")
        result[item_key] = str(item_value)
    return result


def _seeds(path: Path, value: Any) -> tuple[int, ...]:
    """The seeds: a non-empty list of distinct ints."""
    if not isinstance(value, list) or not value or not all(_is_int(s) for s in value):
        raise _fail(path, "seeds", f"must be a non-empty list of integers such as [0, 1, 2], got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(path, "seeds", f"has repeated seeds: {value}")
    return tuple(value)


def _check_file(path: Path, key: str, file: str, check_files: bool) -> None:
    """A config file named by the table must exist (paths are relative to the current directory)."""
    if check_files and not Path(file).is_file():
        raise _fail(path, key, f"config file not found: {file} (paths are relative to the repository root)")


def _cell(path: Path, row: str, column: str, value: Any, check_files: bool) -> Cell:
    """One validated cell."""
    key = f"cells.{row}.{column}"
    if not isinstance(value, Mapping):
        raise _fail(path, key, f"must be a mapping with 'config' (and optional 'overrides', 'paper'), got {value!r}")
    unknown = [k for k in value if k not in CELL_KEYS]
    if unknown:
        raise _fail(path, f"{key}.{unknown[0]}", f"unknown key; a cell has {', '.join(CELL_KEYS)}")
    config = value.get("config")
    if not isinstance(config, str) or not config:
        raise _fail(path, f"{key}.config", f"must be the path of a config file, got {config!r}")
    _check_file(path, f"{key}.config", config, check_files)
    overrides = value.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise _fail(path, f"{key}.overrides", f"must be a list of KEY=VALUE strings, got {overrides!r}")
    paper = value.get("paper")
    if paper is not None and (not isinstance(paper, list) or not paper):
        raise _fail(path, f"{key}.paper", f"must be a non-empty list of keys of docs/paper_results.yaml, got {paper!r}")
    return Cell(row, column, config, tuple(overrides), tuple(paper) if paper is not None else None)


def _cells(path: Path, value: Any, rows: dict[str, str], columns: dict[str, str],
           check_files: bool) -> dict[tuple[str, str], Cell]:
    """All cells; each row and column must be declared, a missing or null cell is an empty cell of the table."""
    if not isinstance(value, Mapping):
        raise _fail(path, "cells", f"must be a mapping row → column → experiment, got {value!r}")
    cells = {}
    for row, by_column in value.items():
        if row not in rows:
            raise _fail(path, f"cells.{row}", f"row is not declared in 'rows' ({', '.join(map(str, rows))})")
        if by_column is None:
            continue
        if not isinstance(by_column, Mapping):
            raise _fail(path, f"cells.{row}", f"must be a mapping column → experiment, got {by_column!r}")
        for column, cell in by_column.items():
            if column not in columns:
                raise _fail(path, f"cells.{row}.{column}",
                            f"column is not declared in 'columns' ({', '.join(map(str, columns))})")
            if cell is not None:
                cells[(row, column)] = _cell(path, row, column, cell, check_files)
    return cells


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping."""
    if not path.is_file():
        raise TableError(f"{path}: table file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise TableError(f"{path}: cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise TableError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TableError(f"{path}: must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    return data


def load_table(path: str | Path, check_files: bool = True) -> Table:
    """Read and validate a table file; `check_files` also requires every named config file to exist."""
    path = Path(path)
    data = _read_yaml(path)
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise _fail(path, str(unknown[0]), f"unknown top-level key; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    for required in ("rows", "columns", "cells"):
        if required not in data:
            raise _fail(path, required, "is required")
    metric = data.get("metric", "best_acc1")
    if metric not in METRICS:
        raise _fail(path, "metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    paper_table = data.get("paper_table")
    if paper_table is not None and not isinstance(paper_table, str):
        raise _fail(path, "paper_table", f"must be a key of docs/paper_results.yaml, got {paper_table!r}")
    teachers = _string_map(path, "teachers", data.get("teachers"), required=False)
    for teacher, config in teachers.items():
        _check_file(path, f"teachers.{teacher}", config, check_files)
    rows = _string_map(path, "rows", data["rows"], required=True)
    columns = _string_map(path, "columns", data["columns"], required=True)
    return Table(
        name=path.stem,
        title=str(data.get("title") or path.stem),
        paper_table=paper_table,
        metric=metric,
        seeds=_seeds(path, data.get("seeds", [0])),
        teachers=teachers,
        rows=rows,
        columns=columns,
        cells=_cells(path, data["cells"], rows, columns, check_files),
        path=path,
    )


def table_root(table: Table, root: str | Path = DEFAULT_RUNS_ROOT) -> Path:
    """<root>/tables/<table name>: every run of the table lives below it."""
    return Path(root) / "tables" / table.name


def run_dir(table: Table, cell: Cell, seed: int, root: str | Path = DEFAULT_RUNS_ROOT) -> Path:
    """<root>/tables/<table>/<row>/<column>/seed<k>."""
    return table_root(table, root) / cell.row / cell.column / f"seed{seed}"


def teacher_run_dir(table: Table, teacher_name: str, root: str | Path = DEFAULT_RUNS_ROOT) -> Path:
    """<root>/tables/<table>/teachers/<teacher>."""
    return table_root(table, root) / "teachers" / teacher_name


def _step(node: Any, key: Any) -> Any:
    """node[key], also matching a key given as text against a numeric YAML key (3.6 vs '3.6'); None when absent."""
    if not isinstance(node, Mapping):
        return None
    if key in node:
        return node[key]
    return next((v for k, v in node.items() if str(k) == str(key)), None)


def paper_value(table: Table, cell: Cell, paper_results: Mapping[str, Any]) -> float | dict | None:
    """The paper's value of the cell: a number, {mean, std[, delta]} or {top1, top5}; None when there is none."""
    path = cell.paper_path
    if path is None:
        if table.paper_table is None:
            return None
        path = (table.paper_table, cell.row, cell.column)
    node: Any = paper_results
    for key in path:
        node = _step(node, key)
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, Mapping) and ("mean" in node or "top1" in node):
        return dict(node)
    return None  # absent, or something that is not a result (a model name)


def paper_number(value: float | Mapping[str, Any] | None) -> float | None:
    """The headline number of a paper value: the number itself, its mean, or its top-1."""
    if isinstance(value, Mapping):
        value = value.get("mean", value.get("top1"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
