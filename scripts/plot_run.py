"""PNG figures from the metrics.jsonl of one or more runs, overlaid: test top-1, losses, τ and λ per epoch.

    python scripts/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]

Writes accuracy.png, loss.png, tau.png and lambda.png into --out (default: the run's own directory for one run,
./plots for several). Runs without a teacher (vanilla) log no τ and no λ schedule, so they are left out of those two
figures. Needs matplotlib: pip install matplotlib (or pip install -e ".[plot]").
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import ctkd  # noqa: F401
except ImportError:  # run as `python scripts/plot_run.py` without an install: only scripts/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctkd.plotting import epoch_axis  # noqa: E402
from ctkd.runs import RunFileError, read_metrics  # noqa: E402

PROG = "plot_run.py"
MATPLOTLIB_MISSING = f'{PROG} needs matplotlib: pip install matplotlib (or pip install -e ".[plot]")'
MULTI_RUN_OUT = Path("plots")
MARKER_MAX_EPOCHS = 30  # mark the points of short runs: a one-epoch run would otherwise draw nothing visible


@dataclass(frozen=True)
class FigureSpec:
    """One output figure: which metrics keys it draws, each with its line style."""

    filename: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metrics.jsonl key, matplotlib line style)
    needs_teacher: bool = False  # τ and λ only mean something when distilling from a teacher


FIGURES = (
    FigureSpec("accuracy.png", "Test top-1 accuracy", "top-1 (%)", (("test_acc1", "-"),)),
    FigureSpec(
        "loss.png", "Losses", "loss",
        (("train_loss", "-"), ("train_loss_ce", "--"), ("train_loss_kd", ":"), ("test_loss", "-.")),
    ),
    FigureSpec("tau.png", "Temperature τ", "τ", (("tau_mean", "-"), ("tau_last", "--")), needs_teacher=True),
    FigureSpec("lambda.png", "Curriculum λ (gradient-reversal strength)", "λ", (("lambda", "-"),), needs_teacher=True),
)


class PlotError(Exception):
    """A run directory that cannot be plotted; the message says which and why."""


@dataclass(frozen=True)
class Run:
    """A run's legend label and its per-epoch records."""

    label: str
    records: list[dict[str, Any]]

    @property
    def has_teacher(self) -> bool:
        """Whether the run distils from a teacher: the trainer logs τ exactly then (vanilla logs λ = 0 only)."""
        return any("tau_mean" in record for record in self.records)


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Legend names: the last 2 components of each run's path, or as many more as make them unique."""
    parts = [path.resolve().parts for path in paths]
    for depth in range(2, max(len(p) for p in parts) + 1):
        labels = [Path(*p[-depth:]).as_posix() for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(path) for path in paths]  # the same directory given twice


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """The runs to plot; raises PlotError for a missing directory or one with no finished epoch."""
    runs = []
    for path, label in zip(paths, run_labels(paths)):
        if not path.is_dir():
            raise PlotError(f"{path} is not a directory")
        try:
            records = read_metrics(path)
        except RunFileError as err:
            raise PlotError(f"{path}: {err}") from None
        if not records:
            raise PlotError(f"{path}: no finished epoch in metrics.jsonl yet, nothing to plot")
        runs.append(Run(label, records))
    return runs


def _points(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that hold a number under `key`."""
    pairs = [(r["epoch"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [epoch for epoch, _ in pairs], [value for _, value in pairs]


def draw_figure(plt: Any, spec: FigureSpec, runs: Sequence[Run], path: Path) -> bool:
    """Draw `spec` for `runs` (one colour per run, one line style per key) into `path`; False if nothing to draw."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn, all_epochs = 0, []
    for index, run in enumerate(runs):
        for key, style in spec.series:
            epochs, values = _points(run.records, key)
            if not epochs:
                continue  # e.g. train_loss_kd of a vanilla run
            all_epochs += epochs
            label = run.label if len(spec.series) == 1 else f"{run.label}: {key}"
            marker = "o" if len(epochs) <= MARKER_MAX_EPOCHS else None
            ax.plot(epochs, values, linestyle=style, marker=marker, markersize=3, color=colors[index % len(colors)],
                    label=label)
            drawn += 1
    if drawn:
        ax.set_title(spec.title if len(runs) > 1 else f"{spec.title}: {runs[0].label}")
        epoch_axis(ax, all_epochs)
        ax.set_ylabel(spec.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn > 0


def plot_runs(plt: Any, runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Write every figure that has data into `out_dir`; says which runs or figures were left out and why."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in FIGURES:
        skipped = [run for run in runs if spec.needs_teacher and not run.has_teacher]
        shown = [run for run in runs if run not in skipped]
        if not shown:
            print(f"{spec.filename}: not written, no run has a teacher (τ and λ are logged only when distilling)")
            continue
        for run in skipped:
            print(f"{spec.filename}: leaving out {run.label} (no teacher, so no τ or λ logged)")
        path = out_dir / spec.filename
        if draw_figure(plt, spec, shown, path):
            written.append(path)
        else:
            print(f"{spec.filename}: not written, no run has these values")
    return written


def import_pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (works without a display); ImportError when not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """RUN_DIR... and --out."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directory with metrics.jsonl")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: RUN_DIR for one run, else ./plots)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Plot the runs and print the paths written; problems are one line on stderr and exit status 1."""
    args = parse_args(argv)
    try:
        plt = import_pyplot()
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return 1
    try:
        runs = load_runs(args.runs)
    except PlotError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    out_dir = args.out or (args.runs[0] if len(args.runs) == 1 else MULTI_RUN_OUT)
    for path in plot_runs(plt, runs, out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
