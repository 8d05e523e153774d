"""Build a table file's table from its runs: mean ± std over seeds next to the paper's numbers, plus τ/λ curves.

    python scripts/make_table.py TABLE [--seeds 0 1] [--runs-root runs] [--out DIR] [--metric best_acc1|last_acc1]

TABLE is a table file or its name in configs/tables (format in docs/tables.md). A run counts as finished when its
results.json covers the epochs its own config plans (ctkd.runs.inspect_run); a cell whose seeds are not all finished
shows how many are, e.g. "71.20 ± 0.10 (2/3)". Runs trained under other settings than the table's (another dataset,
fewer epochs, any override) are marked in their cells and named in the header, and no difference to the paper is
printed for them. Writes into --out (default RUNS_ROOT/tables/<name>/): table.md, table.csv (long format),
tau_lambda.csv (τ and λ per epoch of every run that logged them) and, with matplotlib, tau.png and accuracy.png.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

try:
    import ctkd  # noqa: F401
except ImportError:  # run as `python scripts/make_table.py` without an install: only scripts/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctkd.cli import exit_with  # noqa: E402
from ctkd.errors import UserError  # noqa: E402
from ctkd.plotting import epoch_axis  # noqa: E402
from ctkd.runs import RunFileError, config_value, read_config, read_metrics, read_results  # noqa: E402
from ctkd.tables import (  # noqa: E402
    DEFAULT_RUNS_ROOT,
    METRICS,
    Cell,
    Table,
    find_table,
    inspect_run,
    load_table,
    mean_std,
    paper_value,
    run_dir,
    table_root,
)

PROG = "make_table.py"
PAPER_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "paper_results.yaml"
METRIC_LABELS = {"best_acc1": "best-epoch top-1", "last_acc1": "last-epoch top-1"}
SHORT = {"best_acc1": "best", "last_acc1": "last"}  # in every column header, so a copied column keeps its metric
DASH = "–"
OTHER_SETTINGS = "‡"  # marks a cell whose runs were trained under other settings than the table's
CSV_FIELDS = ("row", "column", "metric", "mean", "std", "n_finished", "n_seeds", "paper_mean", "paper_std", "delta",
              "other_settings")
TAU_FIELDS = ("row", "column", "seed", "epoch", "lambda", "tau_mean", "tau_last")
MATPLOTLIB_MISSING = f"{PROG}: figures (tau.png, accuracy.png) not written: they need `pip install matplotlib`"
MARKER_MAX_EPOCHS = 30  # mark the points of short runs: a one-epoch curve would otherwise draw nothing visible


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


def _number(value: Any) -> float | None:
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
        taus = {record.get("tau_last") for record in records if _number(record.get("tau_last")) is not None}
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
    values = [v for r in runs.results.values() if (v := _number(r.get(metric))) is not None]
    if not values:
        return Stat(None, None, 0, total)
    mean, std = mean_std(values)
    return Stat(mean, std if len(values) > 1 else None, len(values), total)


def load_paper_results() -> dict[str, Any]:
    """docs/paper_results.yaml ({} when it is missing: the tables are still built, without the paper's numbers)."""
    try:
        data = yaml.safe_load(PAPER_RESULTS.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        print(f"{PROG}: warning: cannot read {PAPER_RESULTS} ({err}); the paper column stays empty", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def cell_paper(table: Table, cell: Cell, paper_results: dict[str, Any]) -> Paper:
    """The paper's number of a cell: a plain number, a {mean, std} cell or the top1 of a {top1, top5} cell."""
    value = paper_value(table, cell, paper_results)
    if isinstance(value, dict):
        if "mean" in value:
            return Paper(_number(value.get("mean")), _number(value.get("std")))
        return Paper(_number(value.get("top1")))
    return Paper(_number(value))


def delta(stat: Stat, paper: Paper) -> float | None:
    """Ours − paper, when both are known."""
    return None if stat.mean is None or paper.mean is None else stat.mean - paper.mean


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
                if _number(record.get("tau_mean")) is None and _number(record.get("tau_last")) is None:
                    continue  # vanilla runs log λ = 0 only: no τ to report
                rows.append({
                    "row": row, "column": column, "seed": str(seed), "epoch": str(record["epoch"]),
                    **{key: _csv_number(_number(record.get(key))) for key in ("lambda", "tau_mean", "tau_last")},
                })
    return rows


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    """Rows as CSV with a header row."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def mean_curve(runs: CellRuns, key: str) -> tuple[list[int], list[float]]:
    """(epochs, mean of `key` over the seeds that logged that epoch)."""
    by_epoch: dict[int, list[float]] = {}
    for records in runs.records.values():
        for record in records:
            if (value := _number(record.get(key))) is not None:
                by_epoch.setdefault(record["epoch"], []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def draw_panels(plt: Any, table: Table, cells: dict[tuple[str, str], CellRuns], key: str, ylabel: str,
                title: str, path: Path) -> bool:
    """One panel per table row, one line per cell (mean over seeds); False (nothing written) without data."""
    panels = {}
    for row, row_label in table.rows.items():
        lines = [(table.columns[c], mean_curve(cells[(row, c)], key), len(cells[(row, c)].records))
                 for c in table.columns if (row, c) in cells]
        lines = [line for line in lines if line[1][0]]
        if lines:
            panels[row_label] = lines
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (row_label, lines) in zip(axes.flat, panels.items()):
        # the default cycle has 10 colours; the plug-in table has 12 columns per row
        colors = plt.get_cmap("tab20").colors if len(lines) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, (label, (epochs, values), n_seeds) in enumerate(lines):
            marker = "o" if len(epochs) <= MARKER_MAX_EPOCHS else None
            seeds = "" if n_seeds == len(table.seeds) else f" ({n_seeds}/{len(table.seeds)} seeds)"
            ax.plot(epochs, values, marker=marker, markersize=3, color=colors[index % len(colors)],
                    label=f"{label}{seeds}")
        ax.set_title(row_label, fontsize="medium")
        epoch_axis(ax, [epoch for _, (epochs, _), _ in lines for epoch in epochs])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{table.title}: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def import_pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(table: Table, cells: dict[tuple[str, str], CellRuns], out: Path) -> list[Path]:
    """tau.png (learned-τ cells only, as the paper's temperature figure) and accuracy.png, when there is data."""
    try:
        plt = import_pyplot()
    except ImportError:
        print(MATPLOTLIB_MISSING)
        return []
    written = []
    ctkd_cells = {key: runs for key, runs in cells.items() if runs.learned_tau}
    figures = (
        ("tau.png", ctkd_cells, "tau_last", "τ (last batch of the epoch)", "learned temperature τ, mean over seeds"),
        ("accuracy.png", cells, "test_acc1", "test top-1 (%)", "test top-1 per epoch, mean over seeds"),
    )
    for name, chosen, key, ylabel, title in figures:
        if draw_panels(plt, table, chosen, key, ylabel, title, out / name):
            written.append(out / name)
        else:
            print(f"{name}: not written, no run has logged {key} yet")
    return written


def report_missing(table: Table, cells: dict[tuple[str, str], CellRuns]) -> str:
    """One line: how many cells have no finished seed and how many are partly finished."""
    total = len(table.seeds)
    empty = sum(1 for runs in cells.values() if not runs.results)
    partial = sum(1 for runs in cells.values() if 0 < len(runs.results) < total)
    return (f"{len(cells) - empty - partial} of {len(cells)} cells complete; {partial} partly finished; "
            f"{empty} with no finished seed (missing runs)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """TABLE, --runs-root, --out and --metric."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("table", metavar="TABLE", help="table file, or its name in configs/tables (cifar_kd)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to read instead of the table's (as reproduce.py)")
    parser.add_argument("--runs-root", type=Path, default=Path(DEFAULT_RUNS_ROOT),
                        help="root the table's runs live below (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output folder (default: RUNS_ROOT/tables/<name>/)")
    parser.add_argument("--metric", choices=METRICS,
                        help="metric compared with the paper (default: the table's, i.e. the paper's protocol)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build and write the table; a missing or invalid TABLE is one line on stderr and exit status 1."""
    args = parse_args(argv)
    try:
        # the configs are not needed to read finished runs, so a table whose configs moved still reports
        table = load_table(find_table(args.table), check_files=False)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds):
            print(f"{PROG}: error: --seeds has repeated seeds: {args.seeds}", file=sys.stderr)
            return 1
        table = dataclasses.replace(table, seeds=tuple(args.seeds))
    metric = args.metric or table.metric
    out = args.out or table_root(table, args.runs_root)
    problems: list[str] = []
    cells = {(c.row, c.column): collect_cell(table, c, args.runs_root, problems) for c in table.ordered_cells()}
    paper_results = load_paper_results()
    papers = {key: cell_paper(table, runs.cell, paper_results) for key, runs in cells.items()}
    for problem in problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table, cells, metric, papers)
    (out / "table.md").write_text(text, encoding="utf-8")
    write_csv(out / "table.csv", CSV_FIELDS, csv_rows(table, cells, papers))
    write_csv(out / "tau_lambda.csv", TAU_FIELDS, tau_lambda_rows(cells))
    print(text)
    written = [out / "table.md", out / "table.csv", out / "tau_lambda.csv", *write_figures(table, cells, out)]
    print(report_missing(table, cells))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    exit_with(main)
