"""Checks that need a CUDA device, run on a GPU machine by hand or by scripts/gpu_checks.sh (not collected by the
CPU test suite: the file name does not start with test_). Each test compares the CUDA path with the CPU path."""
from __future__ import annotations

import pytest
import torch

from ctkd.datasets import build_dataset
from ctkd.datasets.transforms import crop_params, train_transform

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gpu_augmentation_is_bit_identical_to_the_cpu_path() -> None:
    """The same (seed, epoch, index) keys give the same crop offsets, flips and normalised pixels on both devices."""
    split = build_dataset("synthetic", root="unused", train=True, train_size=512)
    indices = torch.randperm(512, generator=torch.Generator().manual_seed(0))[:256]
    for epoch in (1, 7):
        on_cpu = crop_params(3, epoch, indices)
        on_gpu = crop_params(3, epoch, indices.cuda())
        assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_gpu))
        cpu_images = train_transform(split.images[indices], indices, seed=3, epoch=epoch, mean=split.mean,
                                     std=split.std)
        gpu_split = split.to("cuda")
        gpu_images = gpu_split.load_batch(indices, epoch=epoch, train=True, seed=3)
        assert gpu_images.is_cuda and torch.equal(gpu_images.cpu(), cpu_images)
        assert torch.equal(gpu_split.load_batch(indices, epoch=epoch, train=False, seed=3).cpu(),
                           split.load_batch(indices, epoch=epoch, train=False, seed=3))


def _cuda_config(tmp_path, **sections):
    """The tiny KD + CTKD run of the CPU tests, on the GPU with its data there."""
    from conftest import load, tiny_run_config

    data = tiny_run_config(tmp_path, **sections)
    data.update(device="cuda", method="kd", teacher={"name": "resnet8", "checkpoint": str(tmp_path / "t.pth")})
    import ctkd.models as models

    torch.manual_seed(0)
    torch.save(models.build_model("resnet8", num_classes=10).state_dict(), tmp_path / "t.pth")
    return load(data, tmp_path)


def test_the_training_step_never_syncs_the_host(tmp_path, monkeypatch) -> None:
    """A whole epoch of KD + CTKD with the data on the GPU under CUDA's sync debug mode set to error: any .item(),
    D2H copy or pageable H2D copy inside the loop raises. The two reads allowed by design are replaced: the
    per-interval flag check and the end-of-epoch summary."""
    from ctkd.build import build_experiment
    from ctkd.distributed import DistributedContext
    from ctkd.guard import NonFiniteGuard
    from ctkd.step import EpochRun
    from ctkd.totals import EpochTotals
    from ctkd.trainer import Trainer

    cfg = _cuda_config(tmp_path, runtime={"compile": "off"})
    device = torch.device("cuda", 0)
    exp = build_experiment(cfg, DistributedContext(device=device))
    monkeypatch.setattr(NonFiniteGuard, "check", lambda self: None)
    monkeypatch.setattr(EpochTotals, "summary", lambda self: {})
    epoch_run = EpochRun.begin(exp, 1, 0.5, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        Trainer(exp, cfg).train_epoch(epoch_run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        exp.close()


def test_compile_on_cuda_matches_eager(tmp_path) -> None:
    """runtime.compile=default on CUDA: a 2-epoch run ends within fp32 tolerance of the eager run."""
    from pathlib import Path

    from ctkd.trainer import run

    states = []
    for mode in ("off", "default"):
        cfg = _cuda_config(tmp_path / mode, epochs=2, runtime={"compile": mode, "cudnn_benchmark": False})
        run(cfg)
        states.append(torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)["trainable"])
    for key in states[0]:
        torch.testing.assert_close(states[1][key].float(), states[0][key].float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("student", ["resnet8", "torchvision.resnet18"])
def test_deterministic_cuda_runs_are_bit_identical(tmp_path, monkeypatch, student) -> None:
    """runtime.deterministic on CUDA: no op of the training path lacks a deterministic kernel (torch would raise),
    and two runs of the same config end with the same bytes (weights, τ, metrics). Run it in a fresh process for
    cuBLAS to start with CUBLAS_WORKSPACE_CONFIG as the run sets it."""
    import json
    from pathlib import Path

    from ctkd.trainer import run

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    states, records = [], []
    try:
        for name in ("a", "b"):
            cfg = _cuda_config(tmp_path / name, epochs=2, student={"name": student},
                               runtime={"compile": "off", "deterministic": True})
            run(cfg)
            states.append(torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)["trainable"])
            lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
            records.append([{k: v for k, v in json.loads(line).items() if k != "epoch_time"} for line in lines])
    finally:
        torch.use_deterministic_algorithms(False)
    assert records[0] == records[1]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
