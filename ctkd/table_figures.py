"""A table's figures: τ of the cells that learn it (the paper's temperature figure) and test top-1 per epoch, one
panel per table row, each line a cell's mean over its seeds (matplotlib, optional)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ctkd.plotting import epoch_axis
from ctkd.table_cells import CellRuns, number_or_none
from ctkd.tables import Table

MATPLOTLIB_MISSING = "make_table.py: figures (tau.png, accuracy.png) not written: they need `pip install matplotlib`"
MARKER_MAX_EPOCHS = 30  # mark the points of short runs: a one-epoch curve would otherwise draw nothing visible


def mean_curve(runs: CellRuns, key: str) -> tuple[list[int], list[float]]:
    """(epochs, mean of `key` over the seeds that logged that epoch)."""
    by_epoch: dict[int, list[float]] = {}
    for records in runs.records.values():
        for record in records:
            if (value := number_or_none(record.get(key))) is not None:
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
