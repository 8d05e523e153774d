"""DDP on CPU with gloo (parity, rank failures, rank-0-only outputs): 2 processes are the same experiment as 1."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_mlp, a BatchNorm-free model)
from conftest import REPO_ROOT, ctkd_config, tiny_run_config, write_yaml
from ctkd.build import build_experiment, build_split, build_split_loader, check_inputs
from ctkd.config import ConfigError, load_config
from ctkd.datasets.loader import Batch
from ctkd.distributed import DistributedContext, broadcast_buffers, init_distributed, shutdown_distributed
from ctkd.evaluation import evaluate
from ctkd.integrity import verify_checksum
from ctkd.methods import StepContext
from ctkd.system import seed_everything
from ctkd.trainer import RunInterrupted, run

pytestmark = pytest.mark.slow  # every test here starts processes or trains whole runs

STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)

WORLD = 2


# ------------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn_name: str, args: tuple) -> None:
    """Process entry for mp.spawn: the environment torchrun would set, then one of this module's workers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    clean = False
    try:
        globals()[fn_name](rank, *args)
        clean = True
    finally:
        shutdown_distributed(clean)


def spawn(fn_name: str, *args: object, world: int = WORLD) -> None:
    mp.spawn(_entry, args=(world, _free_port(), fn_name, args), nprocs=world, join=True)


def ddp_config_file(tmp_path: Path, teacher_file: Path, name: str, **sections: dict) -> Path:
    """conftest's tiny global-CTKD config, with a short DDP timeout and TensorBoard on, written to a file."""
    logging = {"tensorboard": True, "progress_bar": False, **sections.pop("logging", {})}
    distributed = {"timeout_s": 30.0, **sections.pop("distributed", {})}
    data = ctkd_config(tmp_path, teacher_file, name, logging=logging, distributed=distributed, **sections)
    return write_yaml(tmp_path / f"{name}.yaml", data)


def flat_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().double().flatten() for v in state.values()])


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode() + value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def last_state(output_dir: Path) -> dict:
    return torch.load(output_dir / "last.pth", weights_only=True)


# ------------------------------------------------------------------------------------------------ workers
def _worker_train_steps(rank: int, config: str, out: str) -> None:
    """Train one epoch under DDP, then save this rank's trainable state and the samples it saw."""
    cfg = load_config(config)
    ctx = init_distributed(cfg.device, cfg.distributed.timeout_s)
    seed_everything(cfg.seed)
    exp = build_experiment(cfg, ctx)
    exp.distiller.wrap_ddp()
    seen = []
    exp.train_loader.sampler.set_epoch(1)
    for batch in exp.train_loader:
        seen.append(batch.targets)
        out_step = exp.distiller(batch, STEP)
        exp.optimizer.zero_grad()
        sum(out_step.losses.values()).backward()
        exp.optimizer.step()
    trainable = exp.distiller.unwrapped
    params, synced = [None] * ctx.world_size, [None] * ctx.world_size
    dist.all_gather_object(params, state_hash(dict(trainable.named_parameters())))
    state = {k: v.clone() for k, v in trainable.state_dict().items()}  # BN buffers: this rank's last update
    broadcast_buffers(trainable)  # what the trainer does before evaluating and saving
    dist.all_gather_object(synced, state_hash(trainable.state_dict()))
    torch.save({"state": state, "seen": torch.cat(seen), "params": params, "synced": synced},
               Path(out) / f"rank{rank}.pt")


def _worker_run(rank: int, config: str, resume: str | None, fault: str | None) -> None:
    """The whole training run, as train.py runs it under torchrun."""
    if fault:  # "RANK:EPOCH:raise|kill" (tests/fault_hooks.py)
        import fault_hooks

        fault_hooks.install(f"fail:{fault}")
    run(load_config(config), resume=resume)


def _worker_stopped_run(rank: int, config: str, specs: str, out: str) -> None:
    """A run stopped by the fault points `specs`; each rank records, as its run() returns, whether the stop
    checkpoint that rank 0 writes was already complete and verified."""
    import fault_hooks

    fault_hooks.install(specs)
    cfg = load_config(config)
    with pytest.raises(RunInterrupted) as stopped:
        run(cfg)
    stop = stopped.value
    path = Path(cfg.output_dir) / f"ckpt-e{stop.saved_epoch:04d}-s{stop.saved_steps:06d}.pth"
    Path(out, f"left{rank}.json").write_text(json.dumps({"complete": path.is_file() and verify_checksum(path)}))


def _worker_evaluate(rank: int, config: str, weights: str, out: str) -> None:
    cfg = load_config(config)
    ctx = init_distributed(cfg.device, cfg.distributed.timeout_s)
    model = models.build_model(cfg.student.name, num_classes=10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    loader = build_split_loader(cfg, build_split(cfg, train=False), train=False, ctx=ctx)
    metrics = evaluate(model, loader, ctx.device)
    seen = sum(len(batch.targets) for batch in loader)
    Path(out, f"eval{rank}.json").write_text(json.dumps({**metrics, "seen": seen}))


# ------------------------------------------------------------------------------------------------ tests
def test_student_and_temperature_stay_identical_on_every_rank(tmp_path: Path, teacher_file: Path) -> None:
    config = ddp_config_file(tmp_path, teacher_file, "sync")
    spawn("_worker_train_steps", str(config), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # Hashes all-gathered on the ranks themselves: every parameter (student and τ) is identical ...
    assert ranks[0]["params"][0] == ranks[0]["params"][1]
    # ... and so is the whole state, BN statistics included, once rank 0's buffers are broadcast.
    assert ranks[0]["synced"][0] == ranks[0]["synced"][1]
    assert torch.equal(ranks[0]["state"]["temperature.raw"], ranks[1]["state"]["temperature.raw"])
    assert ranks[0]["state"]["temperature.raw"].item() != 1.0  # τ did train
    assert ranks[0]["seen"].numel() == ranks[1]["seen"].numel() == 80  # each rank its half of every batch


def test_ddp_equals_per_rank_half_batches_bit_for_bit(tmp_path: Path, teacher_file: Path) -> None:
    """DDP with plain BN = one process running each rank's half batch and averaging."""
    config = ddp_config_file(tmp_path, teacher_file, "parity")
    spawn("_worker_train_steps", str(config), str(tmp_path))
    ddp_state = torch.load(tmp_path / "rank0.pt", weights_only=True)["state"]

    cfg = load_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the CPU kernels' reduction order depends on the thread count
    try:
        distiller = _emulate_two_ranks_in_one_process(cfg)
    finally:
        torch.set_num_threads(threads)
    for key, value in distiller.unwrapped.state_dict().items():
        assert torch.equal(value, ddp_state[key]), key


def _emulate_two_ranks_in_one_process(cfg):
    """One epoch where each global batch is run as its two rank halves and the two losses are averaged."""
    seed_everything(cfg.seed)  # same seed → the initial weights DDP broadcasts from rank 0
    exp = build_experiment(cfg, DistributedContext())
    distiller = exp.distiller.train()
    exp.train_loader.sampler.set_epoch(1)
    for batch in exp.train_loader:
        half = batch.targets.shape[0] // WORLD
        out0 = distiller(Batch(*(part[:half] for part in batch[:3]), batch.global_size), STEP)
        # Rank 1 updates BN statistics of its own, which DDP then replaces by rank 0's: give the second half
        # throw-away copies of the buffers (restoring in place would invalidate what autograd saved).
        rank0 = [(m, k, b) for m in distiller.unwrapped.modules() for k, b in m._buffers.items() if b is not None]
        for module, key, buffer in rank0:
            module._buffers[key] = buffer.clone()
        out1 = distiller(Batch(*(part[half:] for part in batch[:3]), batch.global_size), STEP)
        for module, key, buffer in rank0:
            module._buffers[key] = buffer
        loss = (sum(out0.losses.values()) + sum(out1.losses.values())) / WORLD
        exp.optimizer.zero_grad()
        loss.backward()
        exp.optimizer.step()
    return distiller


# 163 = 5 × 32 + 3: the last global batch splits 2 + 1 over the ranks.
UNEVEN = {"num_classes": 10, "train_size": 163, "test_size": 71, "seed": 0}


def _nobn_config(tmp_path: Path, teacher_file: Path, name: str, epochs: int) -> Path:
    return ddp_config_file(tmp_path, teacher_file, name, student={"name": "tiny_mlp"}, epochs=epochs, data=UNEVEN)


def _assert_same_run(a: Path, b: Path, atol: float = 1e-6) -> None:
    """Weights, τ and every logged metric agree up to float rounding (BN-free model)."""
    sa, sb = last_state(a), last_state(b)
    torch.testing.assert_close(flat_state(sa["trainable"]), flat_state(sb["trainable"]), rtol=1e-5, atol=atol)
    torch.testing.assert_close(sa["trainable"]["temperature.raw"], sb["trainable"]["temperature.raw"], rtol=1e-5,
                               atol=1e-6)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert len(rows[0]) == len(rows[1])
    for ra, rb in zip(*rows):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - {"epoch_time"}:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["epoch"], key)


def test_ddp_without_batchnorm_matches_full_batch_single_process(tmp_path: Path, teacher_file: Path) -> None:
    """Weights, τ, train metrics (averaged over ranks) and test metrics equal a 1-process run, with an uneven
    last batch."""
    spawn("_worker_run", str(_nobn_config(tmp_path, teacher_file, "nobn", 2)), None, None)
    run(load_config(_nobn_config(tmp_path, teacher_file, "nobn_single", 2)))
    _assert_same_run(tmp_path / "nobn", tmp_path / "nobn_single")
    assert last_state(tmp_path / "nobn")["world_size"] == 2


@pytest.mark.parametrize("method", ["pkt", "sp", "rkd", "dkd", "cc", "dist"])
def test_methods_on_two_processes_equal_one(tmp_path: Path, teacher_file: Path, method: str) -> None:
    """PKT, SP, RKD, CC and DIST's intra-class term compare the samples of a batch with each other: on 2 processes
    they must still see the whole global batch (gathered with gradient), so the run equals the 1-process run, uneven
    last batch included. DKD (per sample, τ inside the method) likewise. CRD has its own test
    (tests/test_method_crd.py)."""
    def config(name: str) -> Path:
        return ddp_config_file(tmp_path, teacher_file, name, student={"name": "tiny_mlp"}, epochs=1, data=UNEVEN,
                           method={"name": method})

    spawn("_worker_run", str(config("two")), None, None)
    run(load_config(config("one")))
    # SP's weight of 3000 scales the rounding of a differently ordered gradient sum: a few weights differ by ~2e-6
    # (without the gather, weights differ by orders of magnitude more). DIST's Pearson correlations of near-uniform
    # softened predictions amplify rounding more: one process run with 1 and with 2 threads already differs by
    # 2.4e-4 after this epoch, so its tolerance is that sensitivity, not the method's.
    _assert_same_run(tmp_path / "two", tmp_path / "one", atol=1e-3 if method == "dist" else 1e-5)
    assert f"train_loss_{method}" in json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])


def test_resume_moves_between_one_and_two_processes(tmp_path: Path, teacher_file: Path) -> None:
    """2 epochs on 2 processes + 1 on 1 process (and the other way round) = 3 epochs on 1 process (BN-free)."""
    run(load_config(_nobn_config(tmp_path, teacher_file, "straight", 3)))
    spawn("_worker_run", str(_nobn_config(tmp_path, teacher_file, "two_then_one", 2)), None, None)
    run(load_config(_nobn_config(tmp_path, teacher_file, "two_then_one", 3)), resume="auto")
    run(load_config(_nobn_config(tmp_path, teacher_file, "one_then_two", 2)))
    spawn("_worker_run", str(_nobn_config(tmp_path, teacher_file, "one_then_two", 3)), "auto", None)
    for resumed, world in (("two_then_one", 1), ("one_then_two", 2)):
        assert last_state(tmp_path / resumed)["world_size"] == world
        _assert_same_run(tmp_path / "straight", tmp_path / resumed)


def test_shards_of_each_global_batch_equal_the_single_process_batch(tmp_path: Path) -> None:
    """Same samples and augmentations per global batch for world sizes 1 and 2 (rank r: its piece of each)."""
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_run_config(tmp_path)))
    dataset = build_split(cfg, train=True)
    single = build_split_loader(cfg, dataset, train=True, ctx=DistributedContext())
    shards = [build_split_loader(cfg, dataset, train=True, ctx=DistributedContext(rank=r, world_size=WORLD))
              for r in range(WORLD)]
    for epoch in (1, 2):
        for loader in (single, *shards):
            loader.sampler.set_epoch(epoch)
        for batch, *pieces in zip(single, *shards):
            assert torch.equal(torch.cat([p.images for p in pieces]), batch.images)
            assert torch.equal(torch.cat([p.targets for p in pieces]), batch.targets)
            assert torch.equal(torch.cat([p.indices for p in pieces]), batch.indices)
            assert all(p.global_size == batch.global_size == len(batch.targets) for p in pieces)


def test_distributed_evaluation_counts_each_image_once(tmp_path: Path) -> None:
    """71 test images over 2 ranks: no padding duplicates; every rank gets the single-process numbers."""
    config = write_yaml(tmp_path / "e.yaml", tiny_run_config(tmp_path, data={
        "num_classes": 10, "train_size": 32, "test_size": 71, "seed": 0}))
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(models.build_model("resnet8", num_classes=10).state_dict(), weights)
    spawn("_worker_evaluate", str(config), str(weights), str(tmp_path))
    cfg = load_config(config)
    model = models.build_model("resnet8", num_classes=10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    loader = build_split_loader(cfg, build_split(cfg, train=False), train=False, ctx=DistributedContext())
    expected = evaluate(model, loader, torch.device("cpu"))
    ranks = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(WORLD)]
    assert sum(r["seen"] for r in ranks) == 71
    for result in ranks:
        assert result["acc1"] == expected["acc1"] and result["acc5"] == expected["acc5"]
        assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # fp32 logits from other batch splits


def test_two_process_run_resumed_after_a_crash_is_bit_identical(tmp_path: Path, teacher_file: Path) -> None:
    straight = ddp_config_file(tmp_path, teacher_file, "straight")
    spawn("_worker_run", str(straight), None, None)

    crashed = ddp_config_file(tmp_path, teacher_file, "crashed")
    # Rank 1 raises in epoch 3; whichever rank's error mp.spawn reports first (the injected fault, or rank 0's
    # gloo error as its peer vanished: "closed" or "reset" by peer, by timing), the job dies after epoch 2's checkpoint.
    with pytest.raises(mp.ProcessRaisedException, match="fault injected|Connection (closed|reset) by peer"):
        spawn("_worker_run", str(crashed), None, "1:3:raise")
    assert last_state(tmp_path / "crashed")["epoch"] == 2
    spawn("_worker_run", str(crashed), "auto", None)  # 2 processes → 2 processes
    a, b = last_state(tmp_path / "straight"), last_state(tmp_path / "crashed")
    assert state_hash(a["trainable"]) == state_hash(b["trainable"])  # student and τ
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("straight", "crashed")]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "epoch_time"} for x in ls] for ls in lines]
    assert strip[0] == strip[1] and len(strip[0]) == 3


def test_no_rank_leaves_a_stopped_run_before_the_stop_checkpoint_is_written(tmp_path: Path, teacher_file: Path) -> None:
    """SIGTERM reaches rank 1 during epoch 2; rank 0 writes the stop checkpoint slowly. A rank that returned (and,
    under torchrun, exited: torchrun then stops the others) before the write ended would let it be killed half done."""
    config = ddp_config_file(tmp_path, teacher_file, "stopped", logging={"interval": 2})
    spawn("_worker_stopped_run", str(config), "signal:2:1:SIGTERM:1,slow_save:ckpt-e0002-s000002.pth:3:0",
          str(tmp_path))
    assert [json.loads((tmp_path / f"left{r}.json").read_text())["complete"] for r in range(WORLD)] == [True, True]


def test_batch_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_run_config(tmp_path, data={"batch_size": 33})))
    with pytest.raises(ValueError, match=r"data\.batch_size = 33 .* number of processes \(2\)"):
        build_split_loader(cfg, build_split(cfg, train=True), train=True, ctx=DistributedContext(world_size=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with cuda, device auto picks the GPU, where SyncBN is allowed")
def test_sync_bn_is_refused_on_cpu(tmp_path: Path, teacher_file: Path) -> None:
    config = ddp_config_file(tmp_path, teacher_file, "syncbn", device="auto", distributed={"sync_bn": True})
    with pytest.raises(ValueError, match="'distributed.sync_bn' needs CUDA devices"):
        check_inputs(load_config(config))


# ------------------------------------------------------------------------------------------------ launchers
def _bare_path(*extra: Path) -> str:
    """A PATH with the system's folders (and `extra`) only: no torchrun and no Python of this environment on it, as
    for a user whose virtual environment is not activated."""
    path = os.pathsep.join([*(str(folder) for folder in extra), "/usr/bin", "/bin"])
    assert shutil.which("torchrun", path=path) is None
    return path


def _launch(command: list[str], fault: str | None = None, env: dict | None = None,
            timeout: float = 120) -> tuple[int, str, float]:
    """Run a launcher from the repository root with this Python in PYTHON and no torchrun on PATH (the launchers
    start torch's launcher with that Python); returns (exit code, output, seconds)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": _bare_path(), "PYTHON": sys.executable, **(env or {})}
    if fault:  # installed in each training process by tests/fault_site/sitecustomize.py
        tests = REPO_ROOT / "tests"
        full_env["PYTHONPATH"] = os.pathsep.join([str(tests / "fault_site"), str(tests), str(REPO_ROOT)])
        full_env["CTKD_TEST_KILL"] = f"fail:{fault}"
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def _processes_mentioning(token: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if token in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _assert_one_writer(out: Path, output: str, epochs: int) -> None:
    """Rank 0 alone wrote the run: one metrics line per epoch, one event file, one console line per epoch."""
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, epochs + 1))
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert output.count(f"epoch 1/{epochs} ") == 1  # the other rank prints errors only
    assert last_state(out)["world_size"] == 2


def test_single_node_launcher(tmp_path: Path, teacher_file: Path) -> None:
    config = ddp_config_file(tmp_path, teacher_file, "one_node", epochs=2)
    code, output, _ = _launch(["bash", "scripts/dist_train.sh", "2", "--config", str(config)])
    assert code == 0, output
    _assert_one_writer(tmp_path / "one_node", output, 2)


def test_multi_node_launcher_with_c10d_rendezvous(tmp_path: Path, teacher_file: Path) -> None:
    """One node of the multi-node launcher: rendezvous through c10d at HOST:PORT."""
    config = ddp_config_file(tmp_path, teacher_file, "multi_node", epochs=1)
    endpoint = f"127.0.0.1:{_free_port()}"
    code, output, _ = _launch(["bash", "scripts/dist_train_multinode.sh", "1", "2", endpoint, "--config", str(config)])
    assert code == 0, output
    _assert_one_writer(tmp_path / "multi_node", output, 1)


def test_slurm_launcher_runs_torchrun_with_sigusr1_forwarded(tmp_path: Path, teacher_file: Path) -> None:
    """The sbatch script with stand-ins for srun and scontrol (this machine has no SLURM)."""
    script = (REPO_ROOT / "scripts/slurm_train.sbatch").read_text()
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script  # else SIGUSR1 kills torchrun
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho 127.0.0.1\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    config = ddp_config_file(tmp_path, teacher_file, "slurm", epochs=1)
    env = {"PATH": _bare_path(bin_dir), "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "2", "MASTER_PORT": str(_free_port()),
           "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
    code, output, _ = _launch(["bash", "scripts/slurm_train.sbatch", "--config", str(config)], env=env)
    assert code == 0, output
    _assert_one_writer(tmp_path / "slurm", output, 1)


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_failing_rank_ends_the_job_naming_it(tmp_path: Path, teacher_file: Path, kind: str) -> None:
    config = ddp_config_file(tmp_path, teacher_file, f"fail_{kind}", epochs=3)
    code, output, seconds = _launch(["bash", "scripts/dist_train.sh", "2", "--config", str(config)],
                                    fault=f"1:2:{kind}", timeout=90)
    assert code != 0 and seconds < 60, output
    assert "rank: 1" in output  # torchrun's failure summary names the failed rank
    if kind == "raise":
        assert "RuntimeError: fault injected" in output  # not a user error: its traceback is kept
    else:
        assert "Signal 9 (SIGKILL)" in output or "exitcode: -9" in output
    assert _processes_mentioning(str(config)) == []  # no orphaned worker


def test_last_batch_too_small_to_share_is_refused(tmp_path: Path) -> None:
    data = {"batch_size": 32, "num_classes": 10, "train_size": 161, "test_size": 20, "seed": 0}
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_run_config(tmp_path, data=data)))
    with pytest.raises(ValueError, match=r"last training batch has 1 samples, fewer than the 2 that 2 process"):
        build_split_loader(cfg, build_split(cfg, train=True), train=True, ctx=DistributedContext(world_size=2))


def test_sync_bn_with_device_cpu_is_refused_by_the_config(tmp_path: Path, teacher_file: Path) -> None:
    config = ddp_config_file(tmp_path, teacher_file, "syncbn_cpu", distributed={"sync_bn": True})  # device: cpu
    with pytest.raises(ConfigError, match=r"syncbn_cpu\.yaml: 'distributed\.sync_bn' needs CUDA devices"):
        load_config(config)
