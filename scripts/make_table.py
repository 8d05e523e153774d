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
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import ctkd  # noqa: F401
except ImportError:  # run as `python scripts/make_table.py` without an install: only scripts/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctkd.cli import exit_with  # noqa: E402
from ctkd.errors import UserError  # noqa: E402
from ctkd.table_cells import cell_paper, collect_cell, load_paper_results, report_missing  # noqa: E402
from ctkd.table_figures import write_figures  # noqa: E402
from ctkd.table_report import CSV_FIELDS, TAU_FIELDS, csv_rows, markdown, tau_lambda_rows, write_csv  # noqa: E402
from ctkd.tables import DEFAULT_RUNS_ROOT, METRICS, find_table, load_table, table_root  # noqa: E402

PROG = "make_table.py"
PAPER_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "paper_results.yaml"


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
    paper_results = load_paper_results(PAPER_RESULTS)
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
