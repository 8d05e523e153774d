"""Cohorts (ctkd.cohort): several runs in one process, one loader and one teacher forward per batch, each member
ending bit-identical to its separate run; skipped, locked, failing and resumed members; the command line."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fault_hooks
import pytest
import torch
import yaml
from resume_tools import fingerprint, free_port

from conftest import ctkd_config, write_yaml
from ctkd import cohort as cohort_module
from ctkd.cohort import check_cohort, shared_key, train_cohort
from ctkd.config import ConfigError, load_config
from ctkd.distiller import Distiller
from ctkd.locks import lock_run
from ctkd.logging import get_logger
from ctkd.schema import config_to_dict
from ctkd.trainer import run

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS, EPOCHS = 5, 3  # tiny_run_config: 160 images in batches of 32, 3 epochs


def members(root: Path, teacher_file: Path) -> list[dict]:
    """KD at a fixed τ with a dropout student (its own RNG stream), global CTKD, and CRD with instance-wise CTKD
    (negatives drawn at random): a checkpoint every 2 steps, the newest 2 kept."""
    configs = [
        ctkd_config(root, teacher_file, "kd", temperature={"name": "fixed", "value": 4.0},
                    student={"name": "tiny_dropout_mlp"}),
        ctkd_config(root, teacher_file, "ctkd"),
        ctkd_config(root, teacher_file, "crd", method={"name": "crd", "nce_k": 16}, temperature={"name": "instance"}),
    ]
    for config in configs:
        config["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    return configs


def write_members(root: Path, teacher_file: Path) -> list[Path]:
    """The members' config files under `root`."""
    return [write_yaml(root / f"{index}.yaml", config) for index, config in enumerate(members(root, teacher_file))]


def cohort_of(paths: list[Path], resume: str | None = None) -> list[cohort_module.Member]:
    """Train the configs `paths` as one cohort in this process."""
    return train_cohort([load_config(path) for path in paths], [str(path) for path in paths], resume)


@pytest.fixture(scope="module")
def separate(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> dict[str, dict]:
    """Each member trained alone: its fingerprint (weights, optimizer, RNG, metrics, TensorBoard)."""
    root = tmp_path_factory.mktemp("separate")
    for path in write_members(root, teacher_file):
        run(load_config(path))
    return {name: fingerprint(root / name) for name in ("kd", "ctkd", "crd")}


@pytest.fixture
def info_logging() -> Iterator[None]:
    """The project's INFO lines logged, as train.py logs them."""
    logger = get_logger()
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def test_members_end_bit_identical_to_their_separate_runs_with_one_teacher_forward_per_batch(
    tmp_path: Path, teacher_file: Path, separate: dict, monkeypatch: pytest.MonkeyPatch, info_logging: None
) -> None:
    real, views = Distiller.compute_teacher_view, []

    def counted(self, images, *, features, preact):  # noqa: ANN001, ANN202
        views.append(features)
        return real(self, images, features=features, preact=preact)

    monkeypatch.setattr(Distiller, "compute_teacher_view", counted)
    outcomes = cohort_of(write_members(tmp_path, teacher_file))
    assert [member.outcome for member in outcomes] == ["trained"] * 3
    for name in ("kd", "ctkd", "crd"):
        assert fingerprint(tmp_path / name) == separate[name], name
        log = (tmp_path / name / "train.log").read_text()
        assert "done: best top-1" in log and str(tmp_path / name / "results.json") in log
    # one logits view (KD, CTKD) and one features view (CRD) per batch; three separate runs take three
    assert views.count(False) == views.count(True) == STEPS * EPOCHS


def test_without_each_members_own_rng_streams_the_members_end_elsewhere(
    tmp_path: Path, teacher_file: Path, separate: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cohort_module, "restore_rng_state", lambda state: None)  # negative control
    cohort_of(write_members(tmp_path, teacher_file))
    assert fingerprint(tmp_path / "kd")["state"] != separate["kd"]["state"]  # its dropout masks
    assert fingerprint(tmp_path / "crd")["state"] != separate["crd"]["state"]  # its negatives


def after_member_1_steps(monkeypatch: pytest.MonkeyPatch, act: Callable[[Distiller, Any, int], None]) -> None:
    """Distiller.__call__ patched so that `act(distiller, batch, steps so far)` runs after every step of member 1
    (the first member to step)."""
    real, calls = Distiller.__call__, []

    def acting(self, batch, ctx):  # noqa: ANN001, ANN202
        out = real(self, batch, ctx)
        calls.append(self)
        if self is calls[0]:
            act(self, batch, calls.count(self))
        return out

    monkeypatch.setattr(Distiller, "__call__", acting)


def test_a_member_that_modifies_the_shared_teacher_output_in_place_is_stopped(
    tmp_path: Path, teacher_file: Path, separate: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def doubled_logits(distiller: Distiller, batch: Any, steps: int) -> None:
        distiller.teacher_output(batch.images).logits.mul_(2)

    after_member_1_steps(monkeypatch, doubled_logits)
    outcomes = cohort_of(write_members(tmp_path, teacher_file))
    assert [member.outcome for member in outcomes] == ["failed", "trained", "trained"]
    assert "changed the cohort's shared teacher output in place" in outcomes[0].detail
    assert fingerprint(tmp_path / "ctkd") == separate["ctkd"]  # the others read the views afresh
    assert fingerprint(tmp_path / "crd") == separate["crd"]


def test_a_member_that_modifies_the_shared_batch_on_its_very_last_step_is_blamed(
    tmp_path: Path, teacher_file: Path, separate: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def on_last_step(distiller: Distiller, batch: Any, steps: int) -> None:  # no hand-over follows it
        if steps == STEPS * EPOCHS:
            batch.images.add_(1)

    after_member_1_steps(monkeypatch, on_last_step)
    outcomes = cohort_of(write_members(tmp_path, teacher_file))
    assert [member.outcome for member in outcomes] == ["failed", "trained", "trained"]
    assert "changed the cohort's shared images in place" in outcomes[0].detail
    assert fingerprint(tmp_path / "ctkd") == separate["ctkd"]  # the batch was made afresh for them
    assert fingerprint(tmp_path / "crd") == separate["crd"]


def test_a_non_finite_member_is_dropped_and_the_others_end_as_alone(
    tmp_path: Path, teacher_file: Path, separate: dict
) -> None:
    configs = members(tmp_path, teacher_file)
    configs[0]["optimizer"] = {**configs[0]["optimizer"], "lr": 1e30}
    paths = [write_yaml(tmp_path / f"{index}.yaml", config) for index, config in enumerate(configs)]
    outcomes = cohort_of(paths)
    assert [member.outcome for member in outcomes] == ["failed", "trained", "trained"]
    assert "non-finite loss" in outcomes[0].detail and (tmp_path / "kd" / "FAILED").is_file()
    assert fingerprint(tmp_path / "ctkd") == separate["ctkd"]
    assert fingerprint(tmp_path / "crd") == separate["crd"]


def test_complete_and_locked_members_are_skipped(tmp_path: Path, teacher_file: Path, separate: dict) -> None:
    paths = write_members(tmp_path, teacher_file)
    run(load_config(paths[0]))  # kd: complete before the cohort starts
    results = (tmp_path / "kd" / "results.json").read_bytes()
    lock = lock_run(tmp_path / "crd")  # crd: another process trains it
    try:
        outcomes = cohort_of(paths, resume="auto")
    finally:
        lock.release()
    assert [member.outcome for member in outcomes] == ["done", "trained", "elsewhere"]
    assert (tmp_path / "kd" / "results.json").read_bytes() == results
    assert not (tmp_path / "crd" / "config.yaml").exists()
    assert fingerprint(tmp_path / "ctkd") == separate["ctkd"]


def test_members_must_share_teacher_data_seed_and_schedule(tmp_path: Path, teacher_file: Path) -> None:
    paths = write_members(tmp_path, teacher_file)
    cfgs = [load_config(path) for path in paths]
    assert len({shared_key(config_to_dict(cfg)) for cfg in cfgs}) == 1  # student, method, τ and optimizer may differ
    other = load_config(paths[1], ["seed=1"])
    with pytest.raises(ConfigError, match=r"1\.yaml: 'seed' differs from .*0\.yaml's"):
        check_cohort([cfgs[0], other], [str(paths[0]), str(paths[1])])
    same_dir = load_config(paths[1], [f"output_dir={cfgs[0].output_dir}"])
    with pytest.raises(ConfigError, match="is also .*0.yaml's; every member needs its own"):
        check_cohort([cfgs[0], same_dir], [str(paths[0]), str(paths[1])])


# ------------------------------------------------------------------------------------------- train.py, kill -9
def train_py(*args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """train.py in a subprocess (with a kill point of tests/fault_hooks.py if `kill` is given)."""
    command = [sys.executable, "-c", "import fault_hooks; fault_hooks.main()", *args]
    return subprocess.run(command, env=fault_hooks.subprocess_env(kill), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def member_args(paths: list[Path]) -> list[str]:
    """--config A --config B ... ."""
    return [part for path in paths for part in ("--config", str(path))]


@pytest.fixture(scope="module")
def separate_subprocess(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> dict[str, dict]:
    """Each member trained alone by train.py (one OpenMP thread, as in every subprocess here)."""
    root = tmp_path_factory.mktemp("separate_subprocess")
    for path in write_members(root, teacher_file):
        result = train_py("--config", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
    return {name: fingerprint(root / name) for name in ("kd", "ctkd", "crd")}


KILLS = [["step:2:3"], ["save:ckpt-e0001-s000004.pth:partial", "eval:2"], ["step:1:1", "step:3:1"]]


@pytest.mark.slow
@pytest.mark.parametrize("kills", KILLS, ids=["+".join(kills) for kills in KILLS])
def test_kill_9_then_resume_auto_ends_every_member_as_alone(
    tmp_path: Path, teacher_file: Path, separate_subprocess: dict, kills: list[str]
) -> None:
    """Killed while a member steps, while it writes a checkpoint, while it evaluates: the members resume from
    their own newest checkpoints (one may be a step ahead of another), catch up, and end as alone."""
    paths = write_members(tmp_path, teacher_file)
    for number, kill in enumerate(kills):
        killed = train_py(*member_args(paths), *(["--resume", "auto"] if number else []), kill=kill)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    done = train_py(*member_args(paths), "--resume", "auto")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("kd", "ctkd", "crd"):
        assert fingerprint(tmp_path / name) == separate_subprocess[name], name


@pytest.mark.slow
def test_a_stop_signal_saves_every_member_and_resume_ends_each_as_alone(
    tmp_path: Path, teacher_file: Path, separate_subprocess: dict
) -> None:
    paths = write_members(tmp_path, teacher_file)
    stopped = train_py(*member_args(paths), kill="signal:2:2:SIGTERM")
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "every run saved where it stopped; continue with:" in stopped.stdout + stopped.stderr
    assert all((tmp_path / name / "last.pth").is_file() for name in ("kd", "ctkd", "crd"))
    assert not any((tmp_path / name / "results.json").exists() for name in ("kd", "ctkd", "crd"))
    done = train_py(*member_args(paths), "--resume", "auto")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("kd", "ctkd", "crd"):
        assert fingerprint(tmp_path / name) == separate_subprocess[name], name


def test_train_py_with_several_configs_trains_a_cohort_and_names_each_outcome(
    tmp_path: Path, teacher_file: Path, separate_subprocess: dict
) -> None:
    paths = write_members(tmp_path, teacher_file)[:2]
    result = train_py("epochs=3", *member_args(paths))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"member 1 ({tmp_path / 'kd'}): trained" in result.stdout
    assert fingerprint(tmp_path / "ctkd") == separate_subprocess["ctkd"]
    again = train_py(*member_args(paths), "--resume", "auto")
    assert again.returncode == 0 and f"member 2 ({tmp_path / 'ctkd'}): done (complete already)" in again.stdout


def test_train_py_overrides_after_a_config_belong_to_it(tmp_path: Path, teacher_file: Path) -> None:
    paths = write_members(tmp_path, teacher_file)[:2]
    printed = train_py("epochs=2", "--config", str(paths[0]), "optimizer.lr=0.2", "--config", str(paths[1]),
                       "--print-config")
    assert printed.returncode == 0, printed.stderr
    first, second = (yaml.safe_load(part) for part in printed.stdout.split("---\n"))
    assert (first["epochs"], second["epochs"]) == (2, 2)
    assert (first["optimizer"]["lr"], second["optimizer"]["lr"]) == (0.2, 0.05)
    mismatch = train_py("--config", str(paths[0]), "--config", str(paths[1]), "data.batch_size=16")
    assert mismatch.returncode == 1
    assert "1.yaml: 'data' differs from" in mismatch.stdout + mismatch.stderr
    assert not (tmp_path / "kd").exists()  # refused before anything was written


# -------------------------------------------------------------------------------------------------- torchrun
def spawned_cohort(rank: int, world: int, port: int, configs: list[str]) -> None:
    """Process entry for mp.spawn: the environment torchrun would set, then the cohort of `configs`."""
    import os

    from ctkd.distributed import shutdown_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    outcomes = train_cohort([load_config(config) for config in configs], configs)
    shutdown_distributed(True)
    assert [member.outcome for member in outcomes] == ["trained"] * len(configs)


def spawned_separate(rank: int, world: int, port: int, configs: list[str]) -> None:
    """Process entry for mp.spawn: each config as its own 2-process run, one after another."""
    from resume_tools import spawned_run

    for number, config in enumerate(configs):
        spawned_run(rank, world, port + number, config)


@pytest.mark.slow
def test_a_cohort_on_two_processes_ends_as_its_members_two_process_runs(tmp_path: Path, teacher_file: Path) -> None:
    import torch.multiprocessing as mp

    together = write_members(tmp_path / "together", teacher_file)
    alone = write_members(tmp_path / "alone", teacher_file)
    mp.spawn(spawned_cohort, args=(2, free_port(), [str(path) for path in together]), nprocs=2, join=True)
    mp.spawn(spawned_separate, args=(2, free_port(), [str(path) for path in alone]), nprocs=2, join=True)
    for name in ("kd", "ctkd", "crd"):
        assert fingerprint(tmp_path / "together" / name) == fingerprint(tmp_path / "alone" / name), name


# ------------------------------------------------------------------------------------------------ the table runner
def cohort_table(tmp_path: Path, teacher_file: Path) -> Path:
    """A one-row table: KD and global CTKD from one teacher file, and the student alone (no teacher: no cohort)."""
    configs = {name: ctkd_config(tmp_path, teacher_file, f"{name}_default", epochs=1, **sections)
               for name, sections in {"kd": {"temperature": {"name": "fixed", "value": 4.0}}, "ctkd": {}}.items()}
    configs["vanilla"] = {key: value for key, value in configs["kd"].items() if key not in ("teacher", "temperature")}
    configs["vanilla"]["method"] = "vanilla"
    paths = {name: write_yaml(tmp_path / "cfg" / f"{name}.yaml", config) for name, config in configs.items()}
    table = {"title": "cohort table", "metric": "best_acc1", "seeds": [0], "rows": {"pair": "resnet14 → resnet8"},
             "columns": {name: name for name in paths},
             "cells": {"pair": {name: {"config": str(path)} for name, path in paths.items()}}}
    return write_yaml(tmp_path / "cohort_table.yaml", table)


def reproduce(table: Path, runs_root: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/reproduce.py from the repository root, as a user runs it."""
    command = [sys.executable, "scripts/reproduce.py", str(table), "--runs-root", str(runs_root), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=fault_hooks.subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def test_the_runner_shows_cohorts_in_dry_run_and_status(tmp_path: Path, teacher_file: Path) -> None:
    table, root = cohort_table(tmp_path, teacher_file), tmp_path / "runs"
    dry = reproduce(table, root, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    commands = [line for line in dry.stdout.splitlines() if line.startswith("python train.py")]
    assert "# cohort of 2 (one loader, one teacher forward per batch): pair/kd seed 0, pair/ctkd seed 0" in dry.stdout
    assert [command.count("--config") for command in commands] == [2, 1]  # kd + ctkd, then vanilla alone
    alone = reproduce(table, root, "--dry-run", "--no-cohorts")
    assert [line.count("--config") for line in alone.stdout.splitlines() if line.startswith("python")] == [1, 1, 1]
    status = reproduce(table, root, "--status")
    assert "cohort 1: 0/2 done: pair/kd seed 0, pair/ctkd seed 0" in status.stdout
    assert not root.exists()  # neither wrote anything


@pytest.mark.slow
def test_the_runner_trains_a_rows_cohort_as_the_runs_alone(tmp_path: Path, teacher_file: Path) -> None:
    table = cohort_table(tmp_path, teacher_file)
    together, alone = reproduce(table, tmp_path / "together"), reproduce(table, tmp_path / "alone", "--no-cohorts")
    assert together.returncode == 0 and alone.returncode == 0, together.stdout + alone.stdout
    assert "start cohort of 2: pair/kd seed 0, pair/ctkd seed 0" in together.stdout
    assert "start cohort" not in alone.stdout
    for column in ("kd", "ctkd", "vanilla"):
        run_dir = Path("tables") / "cohort_table" / "pair" / column / "seed0"
        assert fingerprint(tmp_path / "together" / run_dir) == fingerprint(tmp_path / "alone" / run_dir), column
        assert "done: best top-1" in (tmp_path / "together" / run_dir / "train.log").read_text()
    status = reproduce(table, tmp_path / "together", "--status")
    assert "cohort 1: 2/2 done" in status.stdout
