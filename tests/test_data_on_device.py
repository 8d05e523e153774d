"""runtime.data_on_device: an in-memory split augmented in batches in the training process (on the GPU with CUDA)
gives exactly the batches of the worker path, and a run is unchanged by it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load, tiny_run_config
from ctkd.build import batches_in_process, build_split, build_split_loader
from ctkd.config import ConfigError
from ctkd.distributed import DistributedContext
from ctkd.trainer import run


def _batches(cfg, device: torch.device, epoch: int = 2) -> list:
    loader = build_split_loader(cfg, build_split(cfg, train=True), train=True, ctx=DistributedContext(device=device))
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_in_process_batches_equal_the_worker_batches(tmp_path: Path) -> None:
    workers = load(tiny_run_config(tmp_path, data={"num_workers": 2}, runtime={"data_on_device": "off"}), tmp_path)
    in_process = load(tiny_run_config(tmp_path, runtime={"data_on_device": "on"}), tmp_path, "b.yaml")
    cpu = torch.device("cpu")
    assert not batches_in_process(workers, build_split(workers, train=True), cpu)
    assert batches_in_process(in_process, build_split(in_process, train=True), cpu)
    auto = load({**tiny_run_config(tmp_path), "runtime": {}}, tmp_path, "auto.yaml")  # the default: auto
    assert auto.runtime.data_on_device == "auto" and batches_in_process(auto, build_split(auto, train=True), cpu)
    a, b = _batches(workers, cpu), _batches(in_process, cpu)
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.indices, y.indices) and x.global_size == y.global_size


@pytest.mark.slow
def test_a_run_is_unchanged_by_making_batches_in_process(tmp_path: Path) -> None:
    results = []
    for name, data, runtime in (("w", {"num_workers": 2}, "off"), ("p", {"num_workers": 2}, "on")):
        cfg = load(tiny_run_config(tmp_path, name, epochs=2, data=data, runtime={"data_on_device": runtime}),
                   tmp_path, f"{name}.yaml")
        run(cfg)
        results.append(torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)["trainable"])
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_on_is_refused_for_an_image_folder(tmp_path: Path) -> None:
    from imagefolder import write_image_folder

    root = write_image_folder(tmp_path / "images", classes=2, per_class=2)
    data = {"name": "image_folder", "root": str(root), "batch_size": 2, "num_workers": 0}
    cfg = load({**tiny_run_config(tmp_path), "data": data, "runtime": {"data_on_device": "on"}}, tmp_path)
    with pytest.raises(ConfigError, match="runtime.data_on_device=on needs an in-memory dataset"):
        batches_in_process(cfg, build_split(cfg, train=True), torch.device("cpu"))
    auto = load({**tiny_run_config(tmp_path), "data": data, "runtime": {}}, tmp_path, "auto.yaml")
    assert not batches_in_process(auto, build_split(auto, train=True), torch.device("cuda", 0))  # files: workers
