"""Run reports: ctkd.runs, scripts/summarize_runs.py and scripts/plot_run.py on real tiny run directories."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, load_script, tiny_run_config
from ctkd import trainer
from ctkd.config import config_from_dict
from ctkd.runs import read_metrics, summarize_run, summarize_runs

VANILLA = "baselines/resnet8_vanilla"
CTKD = "ctkd/global"
CRASHED = "ctkd/crashed"
# the scripts as a user runs them: `python scripts/x.py` from the repository root, the repo root not on the path
SCRIPT_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}




summarize_cli = load_script("summarize_runs")
plot_cli = load_script("plot_run")


def train(root: Path, name: str, **sections: dict) -> Path:
    """Train a tiny run into root/name and return its directory."""
    cfg = tiny_run_config(root, name, logging={"tensorboard": False, "progress_bar": False}, **sections)
    trainer.run(config_from_dict(cfg, source=f"test run {name}"))
    return root / name


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real runs: a finished vanilla teacher, a finished global-CTKD student, and a crashed student."""
    root = tmp_path_factory.mktemp("runs")
    vanilla = train(root, VANILLA, epochs=1)
    train(
        root, CTKD, epochs=2, method="kd", teacher={"name": "resnet8", "checkpoint": str(vanilla / "best.pth")},
        temperature={"name": "global"}, curriculum={"name": "cosine", "loops": 2},
    )
    # a crash during epoch 2 of a 2-epoch run: epoch 1's metrics line, no epoch 2 line, no results.json
    crashed = root / CRASHED
    shutil.copytree(root / CTKD, crashed)
    (crashed / "results.json").unlink()
    metrics = crashed / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    config = yaml.safe_load((crashed / "config.yaml").read_text())
    (crashed / "config.yaml").write_text(yaml.safe_dump({**config, "output_dir": str(crashed)}, sort_keys=False))
    return root


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def expected_cells(root: Path) -> dict[str, dict[str, str]]:
    """The table cells each run should show, computed from the run files themselves."""
    vanilla, ctkd = results_of(root / VANILLA), results_of(root / CTKD)
    crashed = metrics_of(root / CRASHED)
    return {
        VANILLA: {
            "method": "vanilla", "teacher → student": "resnet8", "temperature": "-", "seed": "0",
            "best top-1": f"{vanilla['best_acc1']:.2f}", "last top-1": f"{vanilla['last_acc1']:.2f}", "final τ": "",
            "epochs (done/planned)": "1/1", "status": "done",
        },
        CTKD: {
            "method": "kd", "teacher → student": "resnet8 → resnet8", "temperature": "global", "seed": "0",
            "best top-1": f"{ctkd['best_acc1']:.2f}", "last top-1": f"{ctkd['last_acc1']:.2f}",
            "final τ": f"{ctkd['final_tau']:.3f}", "epochs (done/planned)": "2/2", "status": "done",
        },
        CRASHED: {
            "method": "kd", "teacher → student": "resnet8 → resnet8", "temperature": "global", "seed": "0",
            "best top-1": f"{crashed[0]['test_acc1']:.2f}", "last top-1": f"{crashed[0]['test_acc1']:.2f}",
            "final τ": f"{crashed[0]['tau_last']:.3f}", "epochs (done/planned)": "1/2", "status": "interrupted",
        },
    }


# ------------------------------------------------------------------------------------------------ ctkd.runs
def test_summaries_match_the_run_files(runs_root: Path) -> None:
    summaries = {s.name: s for s in summarize_runs(runs_root)}
    assert list(summaries) == [VANILLA, CRASHED, CTKD]  # sorted by path

    vanilla, results = summaries[VANILLA], results_of(runs_root / VANILLA)
    assert (vanilla.status, vanilla.method, vanilla.teacher, vanilla.student) == ("done", "vanilla", None, "resnet8")
    assert (vanilla.temperature, vanilla.final_tau, vanilla.seed) == (None, None, 0)
    assert (vanilla.best_acc1, vanilla.best_epoch) == (results["best_acc1"], results["best_epoch"])
    assert vanilla.last_acc1 == results["last_acc1"] == metrics_of(runs_root / VANILLA)[-1]["test_acc1"]
    assert (vanilla.epochs_done, vanilla.epochs_planned) == (1, 1)

    ctkd, results, records = summaries[CTKD], results_of(runs_root / CTKD), metrics_of(runs_root / CTKD)
    assert (ctkd.status, ctkd.method, ctkd.models, ctkd.temperature) == ("done", "kd", "resnet8 → resnet8", "global")
    assert (ctkd.best_acc1, ctkd.best_epoch) == (results["best_acc1"], results["best_epoch"])
    assert ctkd.last_acc1 == results["last_acc1"] == records[-1]["test_acc1"]
    assert ctkd.final_tau == records[-1]["tau_last"] == results["final_tau"]
    assert (ctkd.epochs_done, ctkd.epochs_planned) == (2, 2)

    crashed, records = summaries[CRASHED], metrics_of(runs_root / CRASHED)
    assert crashed.status == "interrupted"  # checkpoints to continue from, no results
    assert (crashed.best_acc1, crashed.best_epoch) == (records[0]["test_acc1"], 1)  # from metrics: no results.json
    assert crashed.last_acc1 == records[0]["test_acc1"]
    assert crashed.final_tau == records[0]["tau_last"]
    assert (crashed.epochs_done, crashed.epochs_planned) == (1, 2)


def test_best_of_an_unfinished_run_is_the_max_so_far(tmp_path: Path, runs_root: Path) -> None:
    run = shutil.copytree(runs_root / CTKD, tmp_path / "run")
    (run / "results.json").unlink()
    records = metrics_of(run)
    summary = summarize_run(run)
    assert summary.status == "interrupted"  # all epochs logged, but the run did not get to write its results
    best = max(r["test_acc1"] for r in records)
    assert summary.best_acc1 == best
    assert summary.best_epoch == next(r["epoch"] for r in records if r["test_acc1"] == best)
    assert summary.last_acc1 == records[-1]["test_acc1"]


def test_torn_last_metrics_line_is_ignored(tmp_path: Path, runs_root: Path) -> None:
    run = shutil.copytree(runs_root / CRASHED, tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "lr": 0.05, "test_acc1": 99.0, "tau_la')  # a crash in the middle of the append
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    summary = summarize_run(run)
    assert (summary.status, summary.epochs_done) == ("interrupted", 1)
    assert summary.best_acc1 == summary.last_acc1 == metrics_of(runs_root / CRASHED)[0]["test_acc1"]


def test_running_and_failed_runs_are_named_so_with_the_holder_or_the_reason(tmp_path: Path, runs_root: Path) -> None:
    """Neither is 'not started': a run whose lock a live process holds is running (naming it), a run that ended in
    an error is failed (with the error train.py recorded)."""
    from ctkd.locks import lock_run

    running = shutil.copytree(runs_root / CRASHED, tmp_path / "running")
    lock = lock_run(running)
    try:
        assert summarize_run(running).status == f"running: pid {os.getpid()} on " + lock_holder_host(running)
    finally:
        lock.release()
    failed = shutil.copytree(runs_root / CRASHED, tmp_path / "failed")
    (failed / "FAILED").write_text("1\nNonFiniteLossError: non-finite loss in step 3 of epoch 2\n")
    assert summarize_run(failed).status == "failed: NonFiniteLossError: non-finite loss in step 3 of epoch 2"
    assert summarize_run(runs_root / CRASHED).status == "interrupted"


def lock_holder_host(run_dir: Path) -> str:
    """What follows 'pid N on ' in the lock file: the host and the time the lock was taken."""
    return (run_dir / ".lock").read_text().strip().split(" on ", 1)[1]


def test_damaged_or_empty_runs_do_not_break_the_listing(tmp_path: Path, runs_root: Path) -> None:
    shutil.copytree(runs_root / CTKD, tmp_path / "a_ok")
    damaged = shutil.copytree(runs_root / CTKD, tmp_path / "b_damaged")
    lines = (damaged / "metrics.jsonl").read_text().splitlines(keepends=True)
    (damaged / "metrics.jsonl").write_text("{not json\n" + "".join(lines[1:]))
    bad_config = shutil.copytree(runs_root / VANILLA, tmp_path / "c_bad_config")
    (bad_config / "config.yaml").write_text("epochs: [1\n")
    fresh = tmp_path / "d_fresh"
    fresh.mkdir()
    shutil.copy(runs_root / CTKD / "config.yaml", fresh / "config.yaml")  # started, no epoch finished yet

    summaries = {s.name: s for s in summarize_runs(tmp_path)}
    assert list(summaries) == ["a_ok", "b_damaged", "c_bad_config", "d_fresh"]
    assert summaries["a_ok"].status == "done"
    assert summaries["b_damaged"].status == "unreadable: metrics.jsonl line 1 is not JSON"
    assert summaries["c_bad_config"].status.startswith("unreadable: config.yaml is not valid YAML")
    assert summaries["c_bad_config"].last_acc1 == results_of(runs_root / VANILLA)["last_acc1"]  # other files still read
    assert (summaries["d_fresh"].status, summaries["d_fresh"].epochs_done) == ("not started", 0)
    assert summaries["d_fresh"].best_acc1 is None

    assert summarize_cli.main([str(tmp_path)]) == 0  # and the script prints them all


# ------------------------------------------------------------------------------------------------ summarize_runs.py
def test_markdown_table_has_a_header_and_one_row_per_run(runs_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert summarize_cli.main([str(runs_root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 3
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    assert rows[0] == list(summarize_cli.COLUMNS)
    assert set(lines[1]) <= set("|-")
    expected = expected_cells(runs_root)
    for cells in rows[2:]:
        by_column = dict(zip(summarize_cli.COLUMNS, cells))
        assert by_column == {"run": by_column["run"], **expected[by_column["run"]]}
    assert [cells[0] for cells in rows[2:]] == [VANILLA, CRASHED, CTKD]


def test_csv_parses_into_the_same_values(runs_root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "scripts/summarize_runs.py", str(runs_root), "--csv"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=SCRIPT_ENV,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [row["run"] for row in rows] == [VANILLA, CRASHED, CTKD]
    expected = expected_cells(runs_root)
    for row in rows:
        assert row == {"run": row["run"], **expected[row["run"]]}
    ctkd_row = rows[2]
    assert float(ctkd_row["final τ"]) == pytest.approx(results_of(runs_root / CTKD)["final_tau"], abs=5e-4)


@pytest.mark.parametrize("make_dir", [True, False], ids=["empty", "missing"])
def test_no_runs_is_a_one_line_error(tmp_path: Path, make_dir: bool, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "nothing_here"
    if make_dir:
        (target / "sub").mkdir(parents=True)
    assert summarize_cli.main([str(target)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert str(target) in captured.err
    assert ("no run directories" if make_dir else "is not a directory") in captured.err


# ------------------------------------------------------------------------------------------------ plot_run.py
def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    assert len(data) > 5_000, f"{path}: {len(data)} bytes, suspiciously small for a figure"


def test_plot_overlays_two_runs(tmp_path: Path, runs_root: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plots"
    assert plot_cli.main([str(runs_root / CTKD), str(runs_root / CRASHED), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    names = ("accuracy.png", "loss.png", "tau.png", "lambda.png")
    assert printed == [str(out / name) for name in names]
    for name in names:
        assert_png(out / name)
    assert plot_cli.run_labels([runs_root / CTKD, runs_root / CRASHED]) == [CTKD, CRASHED]


def test_plot_leaves_vanilla_out_of_tau_and_lambda(
    tmp_path: Path, runs_root: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "plots"
    assert plot_cli.main([str(runs_root / VANILLA), str(runs_root / CTKD), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"tau.png: leaving out {VANILLA}" in printed
    assert f"lambda.png: leaving out {VANILLA}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "lambda.png", "loss.png", "tau.png"]

    alone = tmp_path / "vanilla_only"
    assert plot_cli.main([str(runs_root / VANILLA), "--out", str(alone)]) == 0
    printed = capsys.readouterr().out
    assert "tau.png: not written" in printed and "lambda.png: not written" in printed
    assert sorted(p.name for p in alone.iterdir()) == ["accuracy.png", "loss.png"]


@pytest.mark.slow
def test_plot_script_writes_into_the_single_run_directory(tmp_path: Path, runs_root: Path) -> None:
    run = shutil.copytree(runs_root / CTKD, tmp_path / "ctkd_run")
    done = subprocess.run(
        [sys.executable, "scripts/plot_run.py", str(run)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=SCRIPT_ENV,
    )
    assert done.returncode == 0, done.stderr
    for name in ("accuracy.png", "loss.png", "tau.png", "lambda.png"):
        assert_png(run / name)
        assert str(run / name) in done.stdout


def test_plot_rejects_a_run_without_epochs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "fresh").mkdir()
    assert plot_cli.main([str(tmp_path / "fresh")]) == 1
    assert "no finished epoch" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install_it(
    runs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot_cli.main([str(runs_root / CTKD), "--out", str(tmp_path / "plots")]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == plot_cli.MATPLOTLIB_MISSING
    assert "pip install matplotlib" in captured.err
    assert not (tmp_path / "plots").exists()


def test_a_one_epoch_run_is_plotted_on_whole_epochs(tmp_path: Path) -> None:
    """One epoch: a tick at 1 and nothing fractional, not matplotlib's axis from 0.95 to 1.05 ticked at 0.96 ...;
    a long run keeps integer ticks."""
    plt = plot_cli.import_pyplot()
    from ctkd.plotting import epoch_axis

    fig, ax = plt.subplots()
    ax.plot([1], [50.0], marker="o")
    epoch_axis(ax, [1])
    fig.canvas.draw()
    assert list(ax.get_xticks()) == [1.0] and ax.get_xlim() == (0.5, 1.5)
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.plot(range(1, 241), range(240))
    epoch_axis(ax, range(1, 241))
    fig.canvas.draw()
    assert all(float(tick).is_integer() for tick in ax.get_xticks())
    plt.close(fig)


def test_stage_records_are_left_out_of_summaries_unless_asked(tmp_path: Path, runs_root: Path) -> None:
    """An initialisation stage's epochs (run epochs ≤ 0, a "stage" key) are not distillation epochs: a run in its
    stage has done none, and its best and last accuracies come from distillation epochs only."""
    run = shutil.copytree(runs_root / CRASHED, tmp_path / "run")
    text = (run / "metrics.jsonl").read_text()
    stage = [json.dumps({"epoch": e, "stage": "ab_init", "stage_epoch": e + 2, "train_loss_ab": 1.0}) for e in (-1, 0)]
    (run / "metrics.jsonl").write_text("\n".join(stage) + "\n" + text)
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    assert [r["epoch"] for r in read_metrics(run, stages=True)] == [-1, 0, 1]
    assert summarize_run(run).epochs_done == 1
    (run / "metrics.jsonl").write_text("\n".join(stage) + "\n")
    assert summarize_run(run).epochs_done == 0
