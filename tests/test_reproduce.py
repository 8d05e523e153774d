"""Table files (ctkd.tables) and scripts/reproduce.py on a tiny table: two cells × two seeds and a teacher, on CPU."""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, load_script, tiny_run_config, write_yaml
from ctkd.locks import lock_holder
from ctkd.runs import inspect_run
from ctkd.scheduler import try_lock
from ctkd.tables import Cell, TableError, load_table, paper_value, run_dir, teacher_run_dir

pytestmark = pytest.mark.slow  # every test here starts processes or trains whole runs

SEEDS = (0, 1)
CELLS = (("pair", "vanilla"), ("pair", "kd"))
TINY = {
    "epochs": 1,
    "data": {"batch_size": 32, "num_classes": 10, "train_size": 64, "test_size": 20, "seed": 0},
    "logging": {"tensorboard": False, "progress_bar": False},
}


def tiny(tmp_path: Path, name: str, **sections: dict) -> dict:
    """A one-epoch config on 64 synthetic samples."""
    config = tiny_run_config(tmp_path, name, **TINY)
    config.update(sections)
    return config


def table_data(tmp_path: Path) -> dict:
    """A table whose kd cell needs a resnet8 teacher that does not exist yet, so the runner trains it."""
    teacher = write_yaml(tmp_path / "cfg" / "teacher.yaml", tiny(tmp_path, "teacher_default"))
    vanilla = write_yaml(tmp_path / "cfg" / "vanilla.yaml", tiny(tmp_path, "vanilla_default"))
    kd = write_yaml(tmp_path / "cfg" / "kd.yaml", tiny(
        tmp_path, "kd_default", method="kd", teacher={"name": "resnet8", "checkpoint": str(tmp_path / "missing.pth")}))
    return {
        "title": "tiny",
        "metric": "best_acc1",
        "seeds": list(SEEDS),
        "teachers": {"resnet8": str(teacher)},
        "rows": {"pair": "resnet8 → resnet8"},
        "columns": {"vanilla": "Vanilla", "kd": "KD"},
        "cells": {"pair": {"vanilla": {"config": str(vanilla)}, "kd": {"config": str(kd)}}},
    }


@pytest.fixture
def table_file(tmp_path: Path) -> Path:
    """tmp_path/tiny.yaml: the tiny table."""
    return write_yaml(tmp_path / "tiny.yaml", table_data(tmp_path))


def reproduce(table: Path, runs_root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run scripts/reproduce.py from the repository root, as a user does."""
    command = [sys.executable, "scripts/reproduce.py", str(table), "--runs-root", str(runs_root), *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def start(table: Path, runs_root: Path, *args: str) -> subprocess.Popen:
    """Start scripts/reproduce.py without waiting for it."""
    command = [sys.executable, "scripts/reproduce.py", str(table), "--runs-root", str(runs_root), *args]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cell_dirs(runs_root: Path) -> list[Path]:
    """The four run directories of the tiny table."""
    return [runs_root / "tables" / "tiny" / row / column / f"seed{seed}" for row, column in CELLS for seed in SEEDS]


def teacher_dir(runs_root: Path) -> Path:
    """The run directory of the table's resnet8 teacher."""
    return runs_root / "tables" / "tiny" / "teachers" / "resnet8"


def attempts(directory: Path) -> int:
    """How many times the runner started train.py in `directory` (one header line per start)."""
    log = directory / "train.log"
    return log.read_text().count("=== ") if log.exists() else 0


def epochs_trained(directory: Path) -> int:
    """How many epoch lines train.py logged in `directory`."""
    return (directory / "train.log").read_text().count("epoch 1/1")


# ------------------------------------------------------------------------------------------------------ ctkd.tables
def test_load_table_reads_cells_in_order_and_paths(table_file: Path) -> None:
    table = load_table(table_file)
    assert table.name == "tiny" and table.seeds == SEEDS and table.paper_table is None
    assert [(c.row, c.column) for c in table.ordered_cells()] == list(CELLS)
    assert [(c.column, s) for c, s in table.runs()] == [("vanilla", 0), ("vanilla", 1), ("kd", 0), ("kd", 1)]
    cell = table.cells[("pair", "kd")]
    assert run_dir(table, cell, 1, "r") == Path("r/tables/tiny/pair/kd/seed1")
    assert run_dir(table, cell, 0) == Path("runs/tables/tiny/pair/kd/seed0")
    assert teacher_run_dir(table, "resnet8") == Path("runs/tables/tiny/teachers/resnet8")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(colour="red"), "colour: unknown top-level key"),
    (lambda d: d["cells"]["pair"].update(ctkd={"config": d["teachers"]["resnet8"]}), "cells.pair.ctkd: column is not"),
    (lambda d: d["cells"].update(other={}), "cells.other: row is not declared"),
    (lambda d: d["cells"]["pair"]["kd"].update(config="nope.yaml"), "cells.pair.kd.config: config file not found"),
    (lambda d: d["cells"]["pair"]["kd"].update(size=3), "cells.pair.kd.size: unknown key"),
    (lambda d: d["cells"]["pair"]["kd"].update(overrides=["epochs"]), "cells.pair.kd.overrides"),
    (lambda d: d.update(seeds=[0, "1"]), "seeds: must be a non-empty list of integers"),
    (lambda d: d.update(seeds=3), "seeds: must be"),
    (lambda d: d.update(metric="top5"), "metric: must be one of"),
    (lambda d: d["teachers"].update(vgg8="missing.yaml"), "teachers.vgg8: config file not found"),
])
def test_load_table_errors_name_file_and_key(tmp_path: Path, change, message: str) -> None:
    data = table_data(tmp_path)
    change(data)
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(TableError, match=message) as info:
        load_table(path)
    assert str(path) in str(info.value)


def test_paper_value_follows_default_and_explicit_paths(table_file: Path) -> None:
    table = load_table(table_file)
    paper = {"tiny": {"pair": {"kd": 70.5, "vanilla": {"mean": 69.0, "std": 0.2}, "name": "resnet8"}},
             "grid": {"fixed": {3.5: 71.0}}, "imagenet": {"kd": {"top1": 71.0, "top5": 90.0}}}
    cell = table.cells[("pair", "kd")]
    assert paper_value(table, cell, paper) is None  # no paper_table and no path: a table of our own
    table = dataclasses.replace(table, paper_table="tiny")
    assert paper_value(table, cell, paper) == 70.5
    assert paper_value(table, table.cells[("pair", "vanilla")], paper) == {"mean": 69.0, "std": 0.2}
    assert paper_value(table, Cell("pair", "kd", "x", (), ("grid", "fixed", "3.5")), paper) == 71.0
    assert paper_value(table, Cell("pair", "kd", "x", (), ("imagenet", "kd")), paper) == {"top1": 71.0, "top5": 90.0}
    assert paper_value(table, Cell("pair", "kd", "x", (), ("tiny", "pair", "name")), paper) is None
    assert paper_value(table, Cell("pair", "kd", "x", (), ("tiny", "absent")), paper) is None


def test_real_tables_load() -> None:
    for path in sorted((REPO_ROOT / "configs" / "tables").glob("*.yaml")):
        assert load_table(path, check_files=False).ordered_cells()


# ---------------------------------------------------------------------------------------------------- reproduce.py


def test_a_locked_run_is_running_and_not_claimed_twice(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    fd = try_lock(directory)
    assert fd is not None and inspect_run(directory).state == "running"
    assert try_lock(directory) is None  # a second claim (another runner) fails while the first holds it
    assert lock_holder(directory).startswith(f"pid {os.getpid()} on ")
    os.close(fd)  # what the kernel does when the holder dies
    assert inspect_run(directory).state == "not started"


def test_gpu_slots_count_within_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script("reproduce")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert script.make_slots(None, 3) == [None]  # cpu: one run at a time
    assert script.make_slots(script.parse_devices("0,1"), 2) == [{"CUDA_VISIBLE_DEVICES": d} for d in "0011"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # e.g. under SLURM: index 1 is the second visible GPU
    assert script.make_slots(["1"], 1) == [{"CUDA_VISIBLE_DEVICES": "6"}]


def test_dry_run_lists_teacher_first_and_every_run_and_writes_nothing(table_file: Path, tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    done = reproduce(table_file, runs_root, "--dry-run")
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 5
    assert "--config" in commands[0] and f"output_dir={teacher_dir(runs_root)}" in commands[0]
    for command, directory in zip(commands[1:], cell_dirs(runs_root)):
        assert f"output_dir={directory} seed={directory.name[-1]}" in command and command.endswith("--resume auto")
    assert all(f"teacher.checkpoint={teacher_dir(runs_root)}/best.pth" in c for c in commands[3:])
    assert not any("teacher.checkpoint" in c for c in commands[1:3])
    assert not runs_root.exists()


def test_set_overrides_reach_every_run_teachers_included(table_file: Path, tmp_path: Path) -> None:
    done = reproduce(table_file, tmp_path / "runs", "--dry-run", "--set", "epochs=2", "--set", "data.num_workers=0")
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 5 and all("epochs=2 data.num_workers=0" in command for command in commands)
    bad = reproduce(table_file, tmp_path / "runs", "--dry-run", "--set", "epochs=0")
    assert bad.returncode == 1 and "epochs" in bad.stdout + bad.stderr  # validated like the file, before anything


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny table trained to the end by two runners started at once, shared by the tests that need finished runs.

    Sharing it keeps the file fast (every train.py start costs seconds of imports); the tests that change a run
    leave it done again. `attempts` is a snapshot taken right after the two runners, before any test reruns a run.
    """
    root = tmp_path_factory.mktemp("table")
    table, runs_root = write_yaml(root / "tiny.yaml", table_data(root)), root / "runs"
    runners = [start(table, runs_root, "--devices", "cpu") for _ in range(2)]
    outputs = [runner.communicate(timeout=240)[0] for runner in runners]
    directories = [teacher_dir(runs_root), *cell_dirs(runs_root)]
    return {
        "table": table,
        "runs_root": runs_root,
        "outputs": outputs,
        "codes": [runner.returncode for runner in runners],
        "attempts": {d: attempts(d) for d in directories},
        "epochs": {d: epochs_trained(d) if (d / "train.log").exists() else 0 for d in directories},
        "results": {d: (d / "results.json").is_file() for d in directories},
    }


@pytest.mark.slow
def test_two_runners_finish_every_run_once_and_the_teacher_once(finished: dict) -> None:
    assert finished["codes"] == [0, 0], finished["outputs"]
    runs_root = finished["runs_root"]
    assert all(finished["results"].values()), finished["outputs"]
    assert [p.name for p in teacher_dir(runs_root).parent.iterdir()] == ["resnet8"]  # one teacher, trained once
    assert set(finished["attempts"].values()) == {1} and set(finished["epochs"].values()) == {1}, finished["outputs"]
    kd_config = (cell_dirs(runs_root)[2] / "config.yaml").read_text()
    assert f"checkpoint: {teacher_dir(runs_root)}/best.pth" in kd_config
    assert all("teacher resnet8" in output for output in finished["outputs"])  # both needed it; one trained it


@pytest.mark.slow
def test_handing_the_lock_to_train_py_is_no_takeover(finished: dict) -> None:
    """The runner locks a run directory and passes the lock to its train.py: a normal hand-over, said nowhere as the
    takeover of a crashed holder's lock."""
    runs_root = finished["runs_root"]
    for directory in [teacher_dir(runs_root), *cell_dirs(runs_root)]:
        assert "took over the lock" not in (directory / "train.log").read_text(), directory
    assert not any("took over the lock" in output for output in finished["outputs"])


@pytest.mark.slow
def test_status_and_the_runner_read_what_a_run_directory_holds(table_file: Path, tmp_path: Path) -> None:
    """A run finished with --set optimizer.lr=0.1: --status without that --set says it is done with other settings
    than the table plans (not 'interrupted'), the runner leaves it alone (never retrains over it, never counts it),
    and with the same --set it is simply done."""
    runs_root = tmp_path / "runs"
    trained = reproduce(table_file, runs_root, "--only-index", "0", "--devices", "cpu", "--set", "optimizer.lr=0.1")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    status = reproduce(table_file, runs_root, "--status", "--only-index", "0")
    assert "done 1  running 0" in status.stdout, status.stdout
    assert "seed 0: done with optimizer.lr=0.1; the table plans optimizer.lr=0.05" in status.stdout
    assert "0/1 done" in status.stdout  # not counted as the table's run
    again = reproduce(table_file, runs_root, "--only-index", "0", "--devices", "cpu")
    assert again.returncode == 1 and "1 left alone" in again.stdout and attempts(cell_dirs(runs_root)[0]) == 1
    assert "not trained over" in again.stdout
    same = reproduce(table_file, runs_root, "--status", "--only-index", "0", "--set", "optimizer.lr=0.1")
    assert "1/1 done" in same.stdout and "plans" not in same.stdout, same.stdout


def test_inspect_run_states_from_the_files(tmp_path: Path) -> None:
    """done / running / interrupted / failed (with its reason) / not started, from the directory alone."""
    directory = tmp_path / "run"
    assert inspect_run(directory).state == "not started"
    directory.mkdir()
    (directory / "config.yaml").write_text("epochs: 3\nseed: 0\n")
    assert inspect_run(directory).state == "not started"  # config written, nothing to continue from
    (directory / "ckpt-e0001-s000005.pth").write_bytes(b"x")
    assert inspect_run(directory).state == "interrupted"
    (directory / "results.json").write_text('{"epochs": 2}')  # an earlier, shorter run's
    assert inspect_run(directory).state == "interrupted"
    (directory / "results.json").write_text('{"epochs": 3}')
    assert inspect_run(directory).state == "done"
    assert (inspect_run(directory, {"epochs": 240, "seed": 0}).describe()
            == "done with epochs=3; the table plans epochs=240")
    (directory / "results.json").unlink()
    (directory / "FAILED").write_text("1\nNonFiniteLossError: non-finite loss in step 2 of epoch 1\n")
    status = inspect_run(directory)
    assert status.describe() == "failed: NonFiniteLossError: non-finite loss in step 2 of epoch 1"


@pytest.mark.slow
def test_status_counts_done_runs_and_a_rerun_skips_everything(finished: dict) -> None:
    table, runs_root = finished["table"], finished["runs_root"]
    status = reproduce(table, runs_root, "--status")
    assert status.returncode == 0 and "4/4 done" in status.stdout, status.stdout + status.stderr
    assert "done 4  running 0  interrupted 0  failed 0  not started 0" in status.stdout

    logs = [d / "train.log" for d in [teacher_dir(runs_root), *cell_dirs(runs_root)]]
    before = [(log.stat().st_mtime_ns, log.stat().st_size) for log in logs]
    again = reproduce(table, runs_root, "--devices", "cpu")
    assert again.returncode == 0 and "5 done (0 trained now)" in again.stdout, again.stdout + again.stderr
    assert [(log.stat().st_mtime_ns, log.stat().st_size) for log in logs] == before


@pytest.mark.slow
def test_interrupted_run_resumes(finished: dict) -> None:
    table, runs_root = finished["table"], finished["runs_root"]
    directory = cell_dirs(runs_root)[3]  # the kd cell, seed 1: it also needs the (done) teacher
    (directory / "results.json").unlink()  # as if the run was stopped after saving last.pth
    assert inspect_run(directory).state == "interrupted"
    count = attempts(directory)
    again = reproduce(table, runs_root, "--devices", "cpu")
    assert again.returncode == 0 and "5 done (1 trained now)" in again.stdout, again.stdout + again.stderr
    assert "resumed from" in (directory / "train.log").read_text()
    assert inspect_run(directory).state == "done" and attempts(directory) == count + 1


@pytest.mark.slow
def test_failed_run_is_reported_and_retried_only_on_request(tmp_path: Path) -> None:
    broken = tiny(tmp_path, "broken")
    synthetic_only = ("num_classes", "train_size", "test_size", "seed")  # not options of cifar100
    broken["data"] = {**{k: v for k, v in broken["data"].items() if k not in synthetic_only}, "name": "cifar100",
                      "root": str(tmp_path / "no_data")}
    config = write_yaml(tmp_path / "cfg" / "broken.yaml", broken)
    table = write_yaml(tmp_path / "tiny.yaml", {
        "seeds": [0], "rows": {"pair": "r"}, "columns": {"vanilla": "v"},
        "cells": {"pair": {"vanilla": {"config": str(config)}}},
    })
    runs_root = tmp_path / "runs"
    directory = runs_root / "tables" / "tiny" / "pair" / "vanilla" / "seed0"
    failed = reproduce(table, runs_root, "--devices", "cpu")
    assert failed.returncode == 1
    assert "FAILED pair/vanilla seed 0: exit status 1" in failed.stdout
    assert str(tmp_path / "no_data") in failed.stdout  # train.py's error line, from the log's tail
    assert (directory / "FAILED").read_text().startswith("1\n") and inspect_run(directory).state == "failed"

    again = reproduce(table, runs_root, "--devices", "cpu")
    assert again.returncode == 1 and "not retried without --retry-failed" in again.stdout
    assert attempts(directory) == 1
    assert inspect_run(directory).state == "failed"

    retried = reproduce(table, runs_root, "--devices", "cpu", "--retry-failed")
    assert retried.returncode == 1 and attempts(directory) == 2


@pytest.mark.slow
def test_ctrl_c_stops_the_children_and_says_how_to_continue(table_file: Path, tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    runner = start(table_file, runs_root, "--only-index", "0", "--devices", "cpu")
    assert runner.stdout.readline().startswith("start pair/vanilla seed 0")  # the child is running now
    runner.send_signal(signal.SIGINT)
    output = runner.communicate(timeout=60)[0]
    assert runner.returncode == 130, output
    assert f"Continue with: python scripts/reproduce.py {table_file}" in output
    directory = cell_dirs(runs_root)[0]
    assert not (directory / "FAILED").exists() and inspect_run(directory).state != "running"  # lock released


def test_slurm_writes_an_array_over_the_runs(table_file: Path, tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    done = reproduce(table_file, runs_root, "--slurm", "--slurm-args", "--partition=gpu", "--gres=gpu:1")
    assert done.returncode == 0, done.stderr
    script = runs_root / "tables" / "tiny" / "slurm_array.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --partition=gpu" in text and "#SBATCH --gres=gpu:1" in text
    assert f"scripts/reproduce.py {table_file} --only-index \"$SLURM_ARRAY_TASK_ID\"" in text
    assert f"--runs-root {runs_root}" in text
    assert f"sbatch {script}" in done.stdout


def test_only_index_out_of_range_is_an_input_error(table_file: Path, tmp_path: Path) -> None:
    done = reproduce(table_file, tmp_path / "runs", "--only-index", "4")
    assert done.returncode == 1 and "out of range: the table has 4 runs" in done.stderr


def test_status_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`reproduce.py --status | head -1` on a table of 2,000 cells (far more than a pipe buffers): the reader goes
    away after one line, and the runner ends quietly, without a BrokenPipeError traceback."""
    config = write_yaml(tmp_path / "cfg" / "vanilla.yaml", tiny(tmp_path, "vanilla_default"))
    columns = {f"c{i}": f"column {i}" for i in range(2000)}
    table = write_yaml(tmp_path / "wide.yaml", {
        "seeds": [0], "rows": {"r": "row"}, "columns": columns,
        "cells": {"r": {column: {"config": str(config)} for column in columns}},
    })
    command = (f"{shlex.quote(sys.executable)} scripts/reproduce.py {shlex.quote(str(table))} --runs-root "
               f"{shlex.quote(str(tmp_path / 'runs'))} --status | head -1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.startswith("wide: wide") and done.stderr == "" and done.returncode == 0, done.stderr
