"""Preemption (R5; C1–C6): SIGTERM, SIGUSR1 and SIGINT stop a real train.py run after a step, on every rank at the
same step, with a checkpoint of that step and exit status 130; `--resume auto` then ends bit-identical to the
uninterrupted run. The signals are sent by the process to itself at a chosen step (tests/fault_hooks.py), as a
scheduler would send them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fault_hooks
import pytest
import torch
from resume_tools import _train_py, dropout_config, fingerprint

from conftest import REPO_ROOT, write_yaml
from ctkd.integrity import verify_checksum

pytestmark = pytest.mark.slow  # every test here starts processes or trains whole runs


def _config(root: Path, name: str, **sections) -> Path:
    """3 epochs × 5 steps of tiny_dropout_mlp, no periodic mid-epoch checkpoint: only the signal makes one."""
    data = dropout_config(root, name, **sections)
    data["checkpoint"] = {"every_steps": 0, "keep_last": 2}
    return write_yaml(root / f"{name}.yaml", data)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("straight")
    done = _train_py(_config(root, "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    return fingerprint(root / "run")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_run_continues_exactly(
    tmp_path: Path, straight: dict, name: str
) -> None:
    config = _config(tmp_path, "run")
    stopped = _train_py(config, kill=f"signal:2:3:{name}")  # arrives during step 4 of epoch 2 (3 steps done)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 130, output
    assert f"stopped by {name} after step 4 of epoch 2" in output and "--resume auto" in output
    assert "Traceback" not in output
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (state["epoch_state"]["epoch"], state["epoch_state"]["step"]) == (2, 4)
    assert (tmp_path / "run" / "ckpt-e0002-s000004.pth").is_file()
    resumed = _train_py(config, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert fingerprint(tmp_path / "run") == straight


def test_a_signal_during_evaluation_stops_at_the_epoch_end(tmp_path: Path, straight: dict) -> None:
    config = _config(tmp_path, "run")
    stopped = _train_py(config, kill="signal:2:5:SIGTERM")  # after epoch 2's last step: evaluation and its save run
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "stopped by SIGTERM after step 5 of epoch 2" in stopped.stdout + stopped.stderr
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 2
    assert _train_py(config, "--resume", "auto").returncode == 0
    assert fingerprint(tmp_path / "run") == straight


def _torchrun(config: Path, *args: str, signal_spec: str | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Two processes under torchrun, in a session (process group) of their own, as a scheduler's job is."""
    full_env = {**fault_hooks.subprocess_env(signal_spec), **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "fault_hooks", "--config", str(config), *args]
    return subprocess.run(command, env=full_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          start_new_session=True)


@pytest.mark.parametrize("step", [4, 5])  # during the epoch's last step, and during its evaluation
def test_a_signal_at_the_end_of_an_epoch_without_checkpoint_saves_that_epoch(
    tmp_path: Path, straight: dict, step: int
) -> None:
    """logging.checkpoint_every 2: epoch 1 is not a checkpoint epoch, yet a stop there must save it."""
    config = _config(tmp_path, "run", logging={"checkpoint_every": 2})
    stopped = _train_py(config, kill=f"signal:1:{step}:SIGTERM")
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 130, output
    assert "stopped by SIGTERM after step 5 of epoch 1" in output and "last.pth holds that point" in output
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (state["epoch"], state["epoch_state"]) == (1, None)
    assert [p.name for p in sorted((tmp_path / "run").glob("ckpt-*.pth"))] == ["ckpt-e0001-s000005.pth"]
    assert _train_py(config, "--resume", "auto").returncode == 0
    assert fingerprint(tmp_path / "run") == straight


def _ddp_sections(**extra: dict) -> dict:
    return {"logging": {"tensorboard": True, "progress_bar": False, "interval": 2, **extra.pop("logging", {})},
            "distributed": {"timeout_s": 60.0}, **extra}


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("straight_ddp")
    done = _torchrun(_config(root, "straight", **_ddp_sections()))
    assert done.returncode == 0, done.stdout + done.stderr
    return fingerprint(root / "straight")


def test_two_processes_save_a_stop_after_the_last_agreement_of_an_epoch(tmp_path: Path, straight_ddp: dict) -> None:
    """logging.interval 2 over 5 steps: a SIGTERM to rank 1 during step 5 of epoch 1 is agreed on only at the
    epoch's end; epoch 1 is not a checkpoint epoch (checkpoint_every 2) and must be saved all the same."""
    config = _config(tmp_path, "run", **_ddp_sections(logging={"checkpoint_every": 2}))
    stopped = _torchrun(config, signal_spec="signal:1:4:SIGTERM:1")
    assert "after step 5 of epoch 1" in stopped.stdout + stopped.stderr, stopped.stdout + stopped.stderr
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (state["epoch"], state["epoch_state"]) == (1, None)
    assert _torchrun(config, "--resume", "auto").returncode == 0
    assert fingerprint(tmp_path / "run") == straight_ddp


def test_sigterm_to_every_process_of_the_job_is_one_request(tmp_path: Path, straight_ddp: dict) -> None:
    """A scheduler signals torchrun and both ranks at once, and torchrun forwards its copy: each rank receives
    SIGTERM twice within milliseconds. That is one request: the stop checkpoint is written, no rank dies by it."""
    config = _config(tmp_path, "run", **_ddp_sections())
    stopped = _torchrun(config, signal_spec="job:2:1:SIGTERM:1")
    output = stopped.stdout + stopped.stderr
    assert "stopped by SIGTERM after step 2 of epoch 2" in output, output
    assert "Signal 15" not in output and "exitcode: -15" not in output  # no worker died of the second copy
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (state["epoch_state"]["epoch"], state["epoch_state"]["step"]) == (2, 2)
    assert _torchrun(config, "--resume", "auto").returncode == 0
    assert fingerprint(tmp_path / "run") == straight_ddp


def test_a_late_second_signal_waits_for_the_stop_checkpoint(tmp_path: Path, straight_ddp: dict) -> None:
    """A second SIGTERM to rank 0 more than 5 s after the first means "stop at once", but not in the middle of the
    stop checkpoint: rank 0 finishes that write (slowed to 8 s here) and only then dies of it."""
    config = _config(tmp_path, "run", **_ddp_sections())
    stopped = _torchrun(config, signal_spec="signal:2:1:SIGTERM:0,slow_save:ckpt-e0002-s000002.pth:8:0:6")
    run_dir = tmp_path / "run"
    assert "exitcode  : -15" in stopped.stdout + stopped.stderr  # rank 0 did die of the second signal ...
    assert verify_checksum(run_dir / "ckpt-e0002-s000002.pth") and not list(run_dir.glob(".*.tmp"))  # ... after it
    assert _torchrun(config, "--resume", "auto").returncode == 0
    assert fingerprint(run_dir) == straight_ddp


def test_two_processes_agree_on_the_step_when_one_rank_is_signalled(tmp_path: Path, straight_ddp: dict) -> None:
    """SIGTERM reaches rank 1 alone during step 2 of epoch 2; with logging.interval 2 both ranks stop after step 2
    (the next agreement), save that point once and continue exactly as the uninterrupted 2-process run."""
    config = _config(tmp_path, "run", **_ddp_sections())
    stopped = _torchrun(config, signal_spec="signal:2:1:SIGTERM:1")
    assert stopped.returncode != 0  # torchrun reports its workers' exit status 130 as a failure
    assert "stopped by a stop signal on another rank after step 2 of epoch 2" in stopped.stdout + stopped.stderr
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (state["epoch_state"]["epoch"], state["epoch_state"]["step"]) == (2, 2)
    resumed = _torchrun(config, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert fingerprint(tmp_path / "run") == straight_ddp


def test_nested_runs_leave_the_handlers_as_they_found_them() -> None:
    """A student run that trains its teacher first installs the stop handlers twice; the process's own handlers
    (here Python's Ctrl-C → KeyboardInterrupt) are back once the outer run ends."""
    import signal

    from ctkd.preemption import STOP

    before = signal.getsignal(signal.SIGINT)
    assert STOP.install() and STOP.install()
    STOP.restore()
    assert signal.getsignal(signal.SIGINT) == STOP._handle  # the outer run still catches it
    STOP.restore()
    assert signal.getsignal(signal.SIGINT) is before
