"""What the resume tests share: tiny runs with dropout, a fingerprint of everything a resumed run must reproduce,
and an in-process crash at a chosen step."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fault_hooks
import pytest
import torch

import tiny_models  # noqa: F401  (registers tiny_dropout_mlp: dropout makes the RNG state matter)
from conftest import REPO_ROOT, load, tiny_run_config
from ctkd import trainer
from ctkd.trainer import run

REAL_BATCHES = trainer.Trainer.batches


def dropout_config(root: Path, name: str, **sections: Any) -> dict:
    """3 epochs × 5 steps of tiny_dropout_mlp; a checkpoint every 2 steps (and at epoch ends), the newest 2 kept.

    Checkpoints: e1 s2, s4, s5 (end) · e2 s1, s3, s5 (end) · e3 s2, s4, s5 (end).
    """
    config = tiny_run_config(root, name, student={"name": "tiny_dropout_mlp"},
                             logging={"tensorboard": True, "progress_bar": False})
    config["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


def fingerprint(run_dir: Path) -> dict[str, Any]:
    """What must equal the uninterrupted run's: a SHA-256 over the final weights, optimizer state, method state,
    grad-scaler and LR-schedule states and RNG states, the progress, the metrics and every TensorBoard scalar as
    (step, value) pairs (times aside)."""
    state = torch.load(run_dir / "last.pth", weights_only=True, map_location="cpu")
    digest = hashlib.sha256()
    for key, value in state["trainable"].items():
        digest.update(key.encode() + value.contiguous().numpy().tobytes())
    for index, param_state in sorted(state["optimizer"]["state"].items()):
        for key, value in sorted(param_state.items()):
            if isinstance(value, torch.Tensor):
                digest.update(f"{index}.{key}".encode() + value.contiguous().numpy().tobytes())
    for key, value in sorted((state.get("method_state") or {}).items()):
        digest.update(key.encode() + value.contiguous().numpy().tobytes())
    digest.update(repr((state.get("grad_scaler"), state.get("lr_scheduler"), state["lr_schedule"])).encode())
    rng = state["rng"]
    digest.update(rng["torch"].numpy().tobytes() + rng["numpy"]["keys"].numpy().tobytes())
    digest.update(repr((rng["python"]["state"], rng["numpy"]["pos"])).encode())
    if "cuda" in rng:
        digest.update(rng["cuda"].numpy().tobytes())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        row.pop("epoch_time")
    return {
        "state": digest.hexdigest(), "epoch": state["epoch"], "best": (state["best_acc1"], state["best_epoch"]),
        "metrics": metrics,
        # wall-clock times (distillation's time/epoch_s, a stage's stage/<name>/epoch_s) are the only values that differ
        "scalars": {tag: steps for tag, steps in tensorboard_scalars(run_dir).items() if not tag.endswith("epoch_s")},
    }


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) pairs as TensorBoard shows them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def files(run_dir: Path) -> dict[str, bytes]:
    """The run directory's files and their bytes (not the hidden lock file, which each start rewrites)."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".pth") or ".pth." in p.name)


class Steps:
    """Wraps Trainer.batches: records the sample indices of every (epoch, step) and where each session started, and
    raises KeyboardInterrupt (an in-process crash) before step `crash` = (epoch, step) if set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, crash: tuple[int, int] | None = None) -> None:
        self.seen: dict[tuple[int, int], list[int]] = {}
        self.starts: list[tuple[int, int]] = []
        self.crash = crash
        monkeypatch.setattr(trainer.Trainer, "batches", lambda owner, epoch_run: self(owner, epoch_run))

    def __call__(self, owner: trainer.Trainer, epoch_run):  # noqa: ANN001, ANN204
        epoch, start = epoch_run.epoch, epoch_run.start_step
        self.starts.append((epoch, start))
        return self._batches(REAL_BATCHES(owner, epoch_run), epoch, start)

    def _batches(self, loader, epoch: int, start: int):  # noqa: ANN001, ANN202
        for step, batch in enumerate(loader, start=start):
            if self.crash == (epoch, step):
                self.crash = None
                raise KeyboardInterrupt(f"simulated crash before step {step} of epoch {epoch}")
            self.seen[(epoch, step)] = batch.indices.tolist()
            yield batch


def crash_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: tuple[int, int]) -> Steps:
    """Run until the in-process crash before step `crash`, then `--resume auto` (the caller may patch in between)."""
    cfg = load(dropout_config(tmp_path, "run"), tmp_path)
    steps = Steps(monkeypatch, crash)
    with pytest.raises(trainer.RunInterrupted):
        run(cfg)
    return steps


def _train_py(config: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """train.py in a subprocess, with a kill point of tests/fault_hooks.py if `kill` is given."""
    env = fault_hooks.subprocess_env(kill)
    command = [sys.executable, "-c", "import fault_hooks; fault_hooks.main()", "--config", str(config), *args]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def run_crashing_in_epoch(cfg, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `cfg` in this process until a simulated kill at the start of `epoch` (the run is interrupted)."""
    real_train = trainer.Trainer.train_epoch

    def crash(self, epoch_run, *args, **kwargs):
        if epoch_run.epoch == epoch:
            raise KeyboardInterrupt(f"simulated kill during epoch {epoch}")
        return real_train(self, epoch_run, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "train_epoch", crash)
    with pytest.raises(trainer.RunInterrupted):
        run(cfg)
    monkeypatch.setattr(trainer.Trainer, "train_epoch", real_train)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawned_run(rank: int, world: int, port: int, config: str) -> None:
    """Process entry for mp.spawn: the environment torchrun would set, then the whole run of `config`."""
    import os

    from ctkd.config import load_config
    from ctkd.distributed import shutdown_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    clean = False
    try:
        run(load_config(config))
        clean = True
    finally:
        shutdown_distributed(clean)
