"""Resume checks that need a CUDA device, run on a GPU machine by hand (not collected by the CPU test suite: the file
name does not start with test_): the CUDA RNG (dropout) and fp16's GradScaler round-trip through a checkpoint taken
inside an epoch, in process and after `kill -9`. The CPU versions are in test_resume.py."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from resume_tools import Steps, _train_py, dropout_config, fingerprint

from conftest import load, write_yaml
from ctkd import trainer
from ctkd.trainer import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = {"device": "cuda", "runtime": {"compile": "off", "deterministic": True}}


def _cuda_sections(amp: str) -> dict:
    return {**CUDA, "runtime": {**CUDA["runtime"], "amp": amp}}


@pytest.mark.parametrize("amp,left_out", [("off", None), ("fp16", None), ("off", "cuda rng")])
def test_mid_epoch_resume_on_cuda_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: str, left_out: str | None
) -> None:
    """A crash after 3 steps of epoch 2 (data and dropout on the GPU), then --resume auto: the uninterrupted run's
    weights, optimizer, RNG states, metrics and scalars; without restoring the CUDA RNG they differ."""
    sections = _cuda_sections(amp)
    run(load(dropout_config(tmp_path, "straight", **sections), tmp_path, "straight.yaml"))
    cfg = load(dropout_config(tmp_path, "crashed", **sections), tmp_path, "crashed.yaml")
    Steps(monkeypatch, crash=(2, 3))
    with pytest.raises(trainer.RunInterrupted):
        run(cfg)
    saved = torch.load(tmp_path / "crashed" / "last.pth", weights_only=True, map_location="cpu")
    assert saved["epoch_state"]["step"] == 3 and "cuda" in saved["rng"]
    assert (saved["grad_scaler"] is not None) == (amp == "fp16")
    if left_out == "cuda rng":
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": None)
    run(cfg, resume="auto")
    same = fingerprint(tmp_path / "straight") == fingerprint(tmp_path / "crashed")
    assert same if left_out is None else not same


def test_kill_9_on_cuda_then_resume_is_bit_identical(tmp_path: Path) -> None:
    sections = _cuda_sections("off")
    straight = write_yaml(tmp_path / "s.yaml", dropout_config(tmp_path, "straight", **sections))
    killed = write_yaml(tmp_path / "k.yaml", dropout_config(tmp_path, "killed", **sections))
    assert _train_py(straight).returncode == 0
    assert _train_py(killed, kill="step:2:3").returncode == -signal.SIGKILL
    done = _train_py(killed, "--resume", "auto")
    assert done.returncode == 0, done.stdout + done.stderr
    assert fingerprint(tmp_path / "straight") == fingerprint(tmp_path / "killed")


def test_checkpoint_points_add_no_host_sync_to_the_step_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An epoch started at step 1 with checkpoint points that are not reached: under CUDA's sync debug mode
    set to error, no step syncs (the batches are loaded beforehand: this is about the step loop; restoring a
    resumed epoch's sums copies them to the device once, before it)."""
    from ctkd.build import build_experiment
    from ctkd.distributed import DistributedContext
    from ctkd.guard import NonFiniteGuard
    from ctkd.step import EpochRun
    from ctkd.totals import EpochTotals
    from ctkd.trainer import Trainer

    sections = {**_cuda_sections("off"), "checkpoint": {"every_steps": 99}}
    cfg = load(dropout_config(tmp_path, "run", **sections), tmp_path)
    device = torch.device("cuda", 0)
    exp = build_experiment(cfg, DistributedContext(device=device))
    exp.train_loader.sampler.set_epoch(1, start_batch=1)
    batches = list(exp.train_loader)
    monkeypatch.setattr(NonFiniteGuard, "check", lambda self: None)
    monkeypatch.setattr(EpochTotals, "summary", lambda self: {})
    epoch_run = EpochRun.begin(exp, 1, 0.0, None)
    epoch_run.start_step = 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        Trainer(exp, cfg).train_epoch(epoch_run, batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        exp.close()
