"""A table's cells as text: table.md (ours beside the paper, runs under other settings marked), table.csv and
tau_lambda.csv."""
from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ctkd.table_cells import CellRuns, Paper, Stat, cell_stat, delta, number_or_none
from ctkd.tables import METRICS, Table

METRIC_LABELS = {"best_acc1": "best-epoch top-1", "last_acc1": "last-epoch top-1"}
SHORT = {"best_acc1": "best", "last_acc1": "last"}  # in every column header, so a copied column keeps its metric
DASH = "–"
OTHER_SETTINGS = "‡"  # marks a cell whose runs were trained under other settings than the table's
CSV_FIELDS = ("row", "column", "metric", "mean", "std", "n_finished", "n_seeds", "paper_mean", "paper_std", "delta",
              "other_settings")
TAU_FIELDS = ("row", "column", "seed", "epoch", "lambda", "tau_mean", "tau_last")


def format_stat(stat: Stat) -> str:
    """'mean ± std', with '(k/N)' appended when not every seed finished; '– (0/N)' with none."""
    if stat.mean is None:
        return f"{DASH} (0/{stat.total})"
    std = DASH if stat.std is None else f"{stat.std:.2f}"
    text = f"{stat.mean:.2f} ± {std}"
    return text if stat.n == stat.total else f"{text} ({stat.n}/{stat.total})"


def format_paper(paper: Paper) -> str:
    """The paper's number as printed: 'mean ± std' or a plain number; '–' when the paper has none."""
    if paper.mean is None:
        return DASH
    return f"{paper.mean:.2f}" if paper.std is None else f"{paper.mean:.2f} ± {paper.std:.2f}"


def format_delta(value: float | None) -> str:
    """A signed difference such as '+0.51'; '–' when unknown."""
    return DASH if value is None else f"{value:+.2f}"


def _markdown_rows(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Markdown table lines; '|' inside cells is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def metric_heading(table: Table, metric: str) -> str:
    """'Best-epoch top-1 (best_acc1, the paper's protocol)' and the like."""
    protocol = ", the paper's protocol" if metric == table.metric else ""
    label = METRIC_LABELS[metric]
    return f"{label[0].upper()}{label[1:]} ({metric}{protocol})"


def metric_block(table: Table, cells: dict[tuple[str, str], CellRuns], metric: str,
                 papers: dict[tuple[str, str], Paper] | None) -> list[str]:
    """One Markdown table of `metric`: a row per table row; per column ours, and with `papers` also paper and Δ."""
    parts = (f"ours, {SHORT[metric]}", "paper", "Δ") if papers is not None else (f"ours, {SHORT[metric]}",)
    header = ["", *(f"{label} ({part})" for label in table.columns.values() for part in parts)]
    lines = []
    for row, row_label in table.rows.items():
        line = [row_label]
        for column in table.columns:
            runs = cells.get((row, column))
            if runs is None:  # an empty cell of the table
                line += [""] * len(parts)
                continue
            stat = cell_stat(runs, metric, len(table.seeds))
            mark = f" {OTHER_SETTINGS}" if runs.other_settings else ""
            line.append(format_stat(stat) + mark)
            if papers is not None:
                paper = papers[(row, column)]
                # a run of another experiment is not compared with the paper's number
                line += [format_paper(paper), OTHER_SETTINGS if mark else format_delta(delta(stat, paper))]
        lines.append(line)
    return _markdown_rows(header, lines)


def markdown(table: Table, cells: dict[tuple[str, str], CellRuns], metric: str,
             papers: dict[tuple[str, str], Paper]) -> str:
    """The whole table.md: title, legend, the chosen metric against the paper, then the other metric."""
    has_paper = any(p.mean is not None for p in papers.values())
    other = next(m for m in METRICS if m != metric)
    legend = (
        f"Legend: ours = mean ± std over the finished seeds {list(table.seeds)} (sample std; {DASH} with one seed); "
        f"(k/N) = only k of the N seeds finished, the mean is over those k. "
        f"The paper's protocol is {METRIC_LABELS[table.metric]} ({table.metric}). "
        + (f"paper = docs/paper_results.yaml; Δ = ours − paper, on {METRIC_LABELS[metric]} ({metric})."
           if has_paper else "No paper numbers for this table.")
    )
    title = table.title + (f" ({OTHER_SETTINGS} runs under other settings than the table's)"
                           if any(runs.other_settings for runs in cells.values()) else "")
    parts = [f"# {title}", "", legend, ""]
    warning = other_settings_note(cells)
    if warning:
        parts += [warning, ""]
    parts += [f"## {metric_heading(table, metric)}", ""]
    parts += metric_block(table, cells, metric, papers if has_paper else None)
    parts += ["", f"## {metric_heading(table, other)}", ""]
    parts += metric_block(table, cells, other, None)
    return "\n".join(parts) + "\n"


def differing_settings(cells: dict[tuple[str, str], CellRuns]) -> dict[str, tuple[list[Any], list[Any]]]:
    """Per experiment key in which some finished runs differ from the table: (their values, the table's values)."""
    found: dict[str, tuple[list[Any], list[Any]]] = {}
    for runs in cells.values():
        for key, ours, theirs in runs.differences:
            values = found.setdefault(key, ([], []))
            for seen, value in zip(values, (ours, theirs)):
                if value not in seen:
                    seen.append(value)
    return found


def _values(values: list[Any]) -> str:
    return " / ".join("(unset)" if value is None else str(value) for value in values)


def other_settings_note(cells: dict[tuple[str, str], CellRuns]) -> str:
    """The header paragraph naming every setting in which runs differ from the table's ('' when none do)."""
    found = differing_settings(cells)
    if not found:
        return ""
    marked = sum(1 for runs in cells.values() if runs.other_settings)
    settings = "; ".join(f"{key} = {_values(ours)} (the table: {_values(theirs)})"
                         for key, (ours, theirs) in found.items())
    return (f"**{OTHER_SETTINGS} Not the table's experiment.** The runs of {marked} of {len(cells)} cells were trained "
            f"under other settings than the table's: {settings}. Their cells are marked {OTHER_SETTINGS} and no "
            "difference to the paper is given for them.")


def _csv_number(value: float | None) -> str:
    """Full precision, so the CSV reads back to the same numbers; empty when unknown."""
    return "" if value is None else repr(value)


def csv_rows(table: Table, cells: dict[tuple[str, str], CellRuns],
             papers: dict[tuple[str, str], Paper]) -> list[dict[str, str]]:
    """table.csv: one row per (cell, metric) in table order."""
    rows = []
    for (row, column), runs in cells.items():
        paper = papers[(row, column)]
        for metric in METRICS:
            stat = cell_stat(runs, metric, len(table.seeds))
            rows.append({
                "row": row, "column": column, "metric": metric,
                "mean": _csv_number(stat.mean), "std": _csv_number(stat.std),
                "n_finished": str(stat.n), "n_seeds": str(stat.total),
                "paper_mean": _csv_number(paper.mean), "paper_std": _csv_number(paper.std),
                "delta": "" if runs.other_settings else _csv_number(delta(stat, paper)),
                "other_settings": "; ".join(f"{key}={ours} (table: {theirs})"
                                            for key, ours, theirs in runs.differences),
            })
    return rows


def tau_lambda_rows(cells: dict[tuple[str, str], CellRuns]) -> list[dict[str, str]]:
    """tau_lambda.csv: τ and λ per epoch of every run (finished or not) that logged τ."""
    rows = []
    for (row, column), runs in cells.items():
        for seed, records in runs.records.items():
            for record in records:
                if number_or_none(record.get("tau_mean")) is None and number_or_none(record.get("tau_last")) is None:
                    continue  # vanilla runs log λ = 0 only: no τ to report
                rows.append({
                    "row": row, "column": column, "seed": str(seed), "epoch": str(record["epoch"]),
                    **{key: _csv_number(number_or_none(record.get(key))) for key in ("lambda", "tau_mean", "tau_last")},
                })
    return rows


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    """Rows as CSV with a header row."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
