"""One row per run directory found below DIR: method, models, temperature, seed, accuracies, final τ and status.

    python scripts/summarize_runs.py DIR [--csv]

Prints a Markdown table (or CSV with --csv), sorted by run path. Unfinished runs show their best top-1 so far.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import ctkd  # noqa: F401
except ImportError:  # run as `python scripts/summarize_runs.py` without an install: only scripts/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctkd.cli import exit_with  # noqa: E402
from ctkd.runs import RunSummary, summarize_runs  # noqa: E402

COLUMNS = (
    "run", "method", "teacher → student", "temperature", "seed", "best top-1", "last top-1", "final τ",
    "epochs (done/planned)", "status",
)
PROG = "summarize_runs.py"


def _fixed(value: float | None, digits: int) -> str:
    """A number with `digits` decimals; empty when unknown."""
    return "" if value is None else f"{value:.{digits}f}"


def row(summary: RunSummary) -> dict[str, str]:
    """The table cells of one run, keyed by column name."""
    known = summary.method is not None  # False when config.yaml could not be read
    planned = "?" if summary.epochs_planned is None else str(summary.epochs_planned)
    return {
        "run": summary.name,
        "method": summary.method or "",
        "teacher → student": summary.models if known else "",
        # '-': τ does not apply (no teacher); an empty cell would read as 'unknown'
        "temperature": summary.temperature or ("-" if known and not summary.teacher else ""),
        "seed": "" if summary.seed is None else str(summary.seed),
        "best top-1": _fixed(summary.best_acc1, 2),
        "last top-1": _fixed(summary.last_acc1, 2),
        "final τ": _fixed(summary.final_tau, 3),
        "epochs (done/planned)": f"{summary.epochs_done}/{planned}",
        "status": summary.status,
    }


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """A Markdown table with a header row; '|' inside cells is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(COLUMNS), "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += [line([r[column] for column in COLUMNS]) for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, str]], stream) -> None:  # noqa: ANN001 - any text stream
    """Rows as CSV with a header row."""
    writer = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """DIR and --csv."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dir", metavar="DIR", help="folder searched (recursively) for run directories")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a Markdown table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary; a missing DIR or one without runs is a one-line error and exit status 1."""
    args = parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"{PROG}: error: {root} is not a directory", file=sys.stderr)
        return 1
    rows = [row(summary) for summary in summarize_runs(root)]
    if not rows:
        print(f"{PROG}: error: no run directories (with config.yaml or metrics.jsonl) below {root}", file=sys.stderr)
        return 1
    if args.csv:
        write_csv(rows, sys.stdout)
    else:
        print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    exit_with(main)
