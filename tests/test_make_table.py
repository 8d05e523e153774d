"""scripts/make_table.py on fabricated run directories (results.json, metrics.jsonl, config.yaml written directly)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, load_script
from ctkd.table_cells import collect_cell
from ctkd.table_figures import mean_curve
from ctkd.table_report import CSV_FIELDS, TAU_FIELDS
from ctkd.tables import load_table

CONFIG = "configs/quickstart.yaml"  # any existing config: the cells are never trained here
FIXED = ["epochs=3", "temperature=fixed", "curriculum=cosine"]  # the cells' overrides: 3 epochs, τ fixed or learned
LEARNED = ["epochs=3"]
ROW, OTHER_ROW = "resnet56_resnet20", "wrn"
SEEDS = [0, 1, 2]
KD_BEST, KD_LAST = [70.0, 71.0, 72.5], [69.5, 70.5, 72.0]
KD_MEAN, KD_STD = 71.166667, 1.258306  # by hand: mean 213.5 / 3; sqrt(((−7/6)² + (−1/6)² + (4/3)²) / 2)
CTKD_BEST = [71.1, 71.3]  # seed 2 unfinished
PKT_BEST = 70.9  # one seed only
EPOCHS = 3




make_table = load_script("make_table")


def planned_config(seed: int, learned_tau: bool, *extra: str) -> dict:
    """The config the table's cell asks for (quickstart with the cell's overrides and the seed), as in config.yaml."""
    from ctkd.config import config_to_dict, load_config

    return config_to_dict(load_config(CONFIG, [*(LEARNED if learned_tau else FIXED), f"seed={seed}", *extra]))


def write_run(path: Path, seed: int, best: float | None, last: float | None, learned_tau: bool,
              config: bool = True, results_epochs: int = EPOCHS, other: tuple[str, ...] = ()) -> None:
    """A run directory: metrics.jsonl, optionally config.yaml (the cell's, with the overrides `other`), and
    results.json when `best` is given (finished)."""
    path.mkdir(parents=True)
    if config:
        (path / "config.yaml").write_text(yaml.safe_dump(planned_config(seed, learned_tau, *other)))
    lines = []
    for epoch in range(1, EPOCHS + 1):
        tau = 1.0 + epoch + seed / 10 if learned_tau else 4.0
        lines.append(json.dumps({"epoch": epoch, "lambda": epoch / EPOCHS, "tau_mean": tau + 0.05, "tau_last": tau,
                                 "test_acc1": 60.0 + epoch + seed}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if best is not None:
        results = {"best_acc1": best, "last_acc1": last, "epochs": results_epochs, "seed": seed, "final_tau": 4.0}
        (path / "results.json").write_text(json.dumps(results))


@pytest.fixture
def table_file(tmp_path: Path) -> Path:
    """A 2×3 table with one empty cell, paper numbers of three kinds and one cell without a paper number."""
    data = {
        "title": "Test table",
        "paper_table": "cifar_kd",
        "metric": "best_acc1",
        "seeds": SEEDS,
        "rows": {ROW: "RN-56 → RN-20", OTHER_ROW: "WRN"},
        "columns": {"kd": "Vanilla KD", "ctkd": "CTKD", "pkt": "PKT"},
        "cells": {
            ROW: {
                # default paper path: [cifar_kd, resnet56_resnet20, kd] = 70.66
                "kd": {"config": CONFIG, "overrides": FIXED},
                "ctkd": {"config": CONFIG, "overrides": LEARNED},  # 71.19
                # {mean: 70.85, std: 0.22}
                "pkt": {"config": CONFIG, "overrides": FIXED, "paper": ["cifar_plugin", ROW, "pkt"]},
            },
            OTHER_ROW: {
                # {top1: 70.83, top5: 90.31}
                "kd": {"config": CONFIG, "overrides": FIXED, "paper": ["imagenet", "kd"]},
                "pkt": {"config": CONFIG, "overrides": FIXED},  # [cifar_kd, wrn, pkt] is not in the paper
            },
        },
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """Runs of the table: kd complete, ctkd 2/3 (seed 2 mid-training), pkt 1/3, wrn/pkt seed 0 with stale results."""
    root = tmp_path / "runs"
    cells = root / "tables" / "mini"
    for seed, best, last in zip(SEEDS, KD_BEST, KD_LAST):
        write_run(cells / ROW / "kd" / f"seed{seed}", seed, best, last, learned_tau=False)
    for seed, best in enumerate(CTKD_BEST):
        write_run(cells / ROW / "ctkd" / f"seed{seed}", seed, best, best - 0.2, learned_tau=True)
    # unfinished (no results.json) and without config.yaml: its changing τ still marks the cell as learning τ
    write_run(cells / ROW / "ctkd" / "seed2", 2, None, None, learned_tau=True, config=False)
    write_run(cells / ROW / "pkt" / "seed1", 1, PKT_BEST, PKT_BEST - 0.4, learned_tau=False)
    # results.json of an earlier 1-epoch run, resumed for EPOCHS: not finished, so its 99.0 must not be averaged
    write_run(cells / OTHER_ROW / "pkt" / "seed0", 0, 99.0, 99.0, learned_tau=False, results_epochs=1)
    return root


def run_main(table: Path, root: Path, *extra: str) -> int:
    """make_table.main on the fixture's table and runs."""
    return make_table.main([str(table), "--runs-root", str(root), *extra])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def csv_row(rows: list[dict[str, str]], row: str, column: str, metric: str) -> dict[str, str]:
    return next(r for r in rows if (r["row"], r["column"], r["metric"]) == (row, column, metric))


def md_row(markdown: str, label: str) -> list[str]:
    """The cells of the first Markdown table line whose first cell is `label`."""
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_mean_std_paper_and_delta(table_file: Path, runs_root: Path) -> None:
    assert run_main(table_file, runs_root) == 0
    markdown = (runs_root / "tables" / "mini" / "table.md").read_text()
    best = md_row(markdown, "RN-56 → RN-20")
    # ours | paper | Δ for kd, ctkd, pkt
    assert best[1:4] == ["71.17 ± 1.26", "70.66", "+0.51"]
    assert best[4:7] == ["71.20 ± 0.14 (2/3)", "71.19", "+0.01"]
    assert best[7:10] == ["70.90 ± – (1/3)", "70.85 ± 0.22", "+0.05"]
    wrn = md_row(markdown, "WRN")
    assert wrn[1:4] == ["– (0/3)", "70.83", "–"]  # {top1, top5} → top1
    assert wrn[4:7] == ["", "", ""]  # the empty cell of the table
    assert wrn[7:10] == ["– (0/3)", "–", "–"]  # stale results.json of a shorter run is not finished


def test_best_and_last_blocks_are_labelled(table_file: Path, runs_root: Path) -> None:
    assert run_main(table_file, runs_root) == 0
    markdown = (runs_root / "tables" / "mini" / "table.md").read_text()
    assert markdown.startswith("# Test table\n")
    legend = next(line for line in markdown.splitlines() if line.startswith("Legend:"))
    assert "paper's protocol is best-epoch top-1 (best_acc1)" in legend and "sample std" in legend
    best_at = markdown.index("## Best-epoch top-1 (best_acc1, the paper's protocol)")
    last_at = markdown.index("## Last-epoch top-1 (last_acc1)")
    assert best_at < last_at
    assert "Vanilla KD (ours, best)" in markdown[best_at:last_at]
    last_block = markdown[last_at:]
    assert "Vanilla KD (ours, last)" in last_block
    assert md_row(last_block, "RN-56 → RN-20")[1] == "70.67 ± 1.26"  # mean of 69.5, 70.5, 72.0


def test_metric_option_compares_last_epoch(table_file: Path, runs_root: Path) -> None:
    assert run_main(table_file, runs_root, "--metric", "last_acc1") == 0
    markdown = (runs_root / "tables" / "mini" / "table.md").read_text()
    assert markdown.index("## Last-epoch top-1 (last_acc1)") < markdown.index("## Best-epoch top-1 (best_acc1, the")
    assert md_row(markdown, "RN-56 → RN-20")[1:4] == ["70.67 ± 1.26", "70.66", "+0.01"]


def test_csv_reads_back_to_the_numbers(table_file: Path, runs_root: Path) -> None:
    assert run_main(table_file, runs_root) == 0
    rows = read_csv(runs_root / "tables" / "mini" / "table.csv")
    assert list(rows[0]) == list(CSV_FIELDS)
    assert len(rows) == 5 * 2  # five cells × (best_acc1, last_acc1)
    kd = csv_row(rows, ROW, "kd", "best_acc1")
    assert float(kd["mean"]) == pytest.approx(KD_MEAN, abs=1e-6)
    assert float(kd["std"]) == pytest.approx(KD_STD, abs=1e-6)
    assert (kd["n_finished"], kd["n_seeds"], kd["paper_mean"], kd["paper_std"]) == ("3", "3", "70.66", "")
    assert float(kd["delta"]) == pytest.approx(KD_MEAN - 70.66, abs=1e-6)
    ctkd = csv_row(rows, ROW, "ctkd", "best_acc1")
    assert ctkd["n_finished"] == "2" and float(ctkd["mean"]) == pytest.approx(71.2)  # unfinished seed 2 left out
    pkt = csv_row(rows, ROW, "pkt", "last_acc1")
    assert (float(pkt["mean"]), pkt["std"], pkt["n_finished"]) == (pytest.approx(70.5), "", "1")
    assert (float(pkt["paper_mean"]), float(pkt["paper_std"])) == (70.85, 0.22)
    empty = csv_row(rows, OTHER_ROW, "pkt", "best_acc1")
    assert (empty["mean"], empty["n_finished"], empty["paper_mean"], empty["delta"]) == ("", "0", "", "")


def test_tau_lambda_csv(table_file: Path, runs_root: Path) -> None:
    assert run_main(table_file, runs_root) == 0
    rows = read_csv(runs_root / "tables" / "mini" / "tau_lambda.csv")
    assert list(rows[0]) == list(TAU_FIELDS)
    assert len(rows) == 8 * EPOCHS  # every run that logged τ, the unfinished ones included
    unfinished = [r for r in rows if (r["row"], r["column"], r["seed"]) == (ROW, "ctkd", "2")]
    assert [(r["epoch"], float(r["tau_last"]), float(r["tau_mean"]), float(r["lambda"])) for r in unfinished] == [
        ("1", 2.2, pytest.approx(2.25), pytest.approx(1 / 3)),
        ("2", 3.2, pytest.approx(3.25), pytest.approx(2 / 3)),
        ("3", 4.2, pytest.approx(4.25), 1.0),
    ]


def test_figures_are_valid_pngs(table_file: Path, runs_root: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    assert run_main(table_file, runs_root) == 0
    out = runs_root / "tables" / "mini"
    for name in ("tau.png", "accuracy.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(path).ndim == 3


def test_only_learned_tau_cells_are_in_the_tau_figure(table_file: Path, runs_root: Path) -> None:
    table = load_table(table_file, check_files=False)
    cells = {key: collect_cell(table, cell, runs_root, []) for key, cell in table.cells.items()}
    assert {key for key, runs in cells.items() if runs.learned_tau} == {(ROW, "ctkd")}
    epochs, taus = mean_curve(cells[(ROW, "ctkd")], "tau_last")
    assert epochs == [1, 2, 3] and taus == pytest.approx([2.1, 3.1, 4.1])  # mean of seeds 0, 1, 2


def test_stdout_lists_table_paths_and_missing_cells(table_file: Path, runs_root: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = runs_root.parent / "elsewhere"
    assert run_main(table_file, runs_root, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| RN-56 → RN-20 | 71.17 ± 1.26 |" in printed
    assert "1 of 5 cells complete; 2 partly finished; 2 with no finished seed" in printed
    for name in ("table.md", "table.csv", "tau_lambda.csv", "tau.png", "accuracy.png"):
        assert f"wrote {out / name}" in printed
    assert not (runs_root / "tables" / "mini" / "table.md").exists()


def test_without_matplotlib(table_file: Path, runs_root: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert run_main(table_file, runs_root) == 0
    out = runs_root / "tables" / "mini"
    assert {p.name for p in out.iterdir() if p.is_file()} == {"table.md", "table.csv", "tau_lambda.csv"}
    printed = capsys.readouterr().out
    assert sum("pip install matplotlib" in line for line in printed.splitlines()) == 1


@pytest.mark.parametrize("content", [None, "metric: top5\nrows: {a: A}\ncolumns: {b: B}\ncells: {}\n", "- [unclosed"])
def test_bad_table_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert make_table.main([str(path), "--runs-root", str(tmp_path / "runs")]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("make_table.py: error: ") and captured.err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_command_line(table_file: Path, runs_root: Path) -> None:
    """As a user runs it: `python scripts/make_table.py` from the repository root, the repo not on the path."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "scripts/make_table.py", str(table_file), "--runs-root", str(runs_root)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| RN-56 → RN-20 | 71.17 ± 1.26 | 70.66 | +0.51 |" in done.stdout
    missing = subprocess.run([sys.executable, "scripts/make_table.py", "no_such_table"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no table file 'no_such_table'" in missing.stderr


def test_runs_under_other_settings_are_marked_and_not_compared_with_the_paper(table_file: Path,
                                                                             runs_root: Path) -> None:
    """A finished seed of the kd cell trained with optimizer.lr=0.1 (not the table's 0.05): the title and a header
    paragraph say so with the setting, the cell is marked ‡ and has no Δ; the other cells are untouched."""
    cells = runs_root / "tables" / "mini"
    for seed in SEEDS:
        other = cells / OTHER_ROW / "kd" / f"seed{seed}"
        write_run(other, seed, 10.16, 10.0, learned_tau=False, other=("optimizer.lr=0.1",))
    assert run_main(table_file, runs_root) == 0
    markdown = (cells / "table.md").read_text()
    assert markdown.startswith("# Test table (‡ runs under other settings than the table's)\n")
    note = next(line for line in markdown.splitlines() if line.startswith("**‡ Not the table's experiment.**"))
    assert "optimizer.lr = 0.1 (the table: 0.05)" in note and "1 of 5 cells" in note
    assert md_row(markdown, "WRN")[1:4] == ["10.16 ± 0.00 ‡", "70.83", "‡"]
    assert md_row(markdown, "RN-56 → RN-20")[1:4] == ["71.17 ± 1.26", "70.66", "+0.51"]
    rows = read_csv(cells / "table.csv")
    wrn = csv_row(rows, OTHER_ROW, "kd", "best_acc1")
    assert wrn["delta"] == "" and wrn["other_settings"] == "optimizer.lr=0.1 (table: 0.05)"


def test_seeds_option_reads_those_seeds(table_file: Path, runs_root: Path) -> None:
    assert run_main(table_file, runs_root, "--seeds", "0") == 0
    markdown = (runs_root / "tables" / "mini" / "table.md").read_text()
    assert md_row(markdown, "RN-56 → RN-20")[1:4] == ["70.00 ± –", "70.66", "-0.66"]
    assert "finished seeds [0]" in markdown
