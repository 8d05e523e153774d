"""Checkpoint files: published teacher layouts, strict loading with helpful errors, atomic writes, RNG states."""
from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from resume_tools import dropout_config

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_dropout_mlp: dropout makes the RNG state matter)
from conftest import DAMAGE, REPO_ROOT, damage, load, tiny_run_config
from ctkd import fileio
from ctkd.checkpoint import capture_rng_state, load_run_checkpoint, restore_rng_state
from ctkd.integrity import CheckpointError, atomic_save, load_file, stored_checksum
from ctkd.networks import identify_architectures
from ctkd.provenance import file_sha256
from ctkd.trainer import run
from ctkd.weights import load_weights_strict


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return models.build_model("resnet8", num_classes=100).state_dict()


def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    return {
        "crd_periodic": {"epoch": 240, "model": sd, "accuracy": torch.tensor(72.3), "optimizer": {"state": {}}},
        "crd_last_with_namespace": {"opt": argparse.Namespace(model="resnet8", lr=0.05), "model": sd},
        "mdistiller_student": {"model": sd},
        "state_dict_key": {"state_dict": sd, "epoch": 3},
        "bare": sd,
        "ddp_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "compile_prefix": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "ddp_and_compile": {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
        "ctkd_run": {"format": "ctkd-run", "version": 1, "student": sd, "temperature": {"raw": torch.tensor(1.0)}},
    }


@pytest.mark.parametrize("layout", list(_layouts({}).keys()))
def test_published_layouts_load_strictly(tmp_path: Path, weights: dict, layout: str) -> None:
    path = tmp_path / f"{layout}.pth"
    torch.save(_layouts(weights)[layout], path)
    model = models.build_model("resnet8", num_classes=100)
    load_weights_strict(model, path, arch="resnet8")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_mismatch_names_keys_and_the_matching_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": models.build_model("resnet14", num_classes=100).state_dict()}, path)
    model = models.build_model("resnet8", num_classes=100)
    with pytest.raises(CheckpointError) as info:
        load_weights_strict(model, path, arch="resnet8", identify=lambda sd: identify_architectures(sd, 100))
    message = str(info.value)
    assert str(path) in message and "'resnet8'" in message
    assert "unexpected keys: layer1.1.conv1.weight" in message
    assert "matches architecture(s): resnet14" in message


def test_shape_mismatch_is_reported(tmp_path: Path, weights: dict) -> None:
    path = tmp_path / "ten_classes.pth"
    torch.save({"model": models.build_model("resnet8", num_classes=10).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"fc\.weight: file \(10, 64\) vs model \(100, 64\)"):
        load_weights_strict(models.build_model("resnet8", num_classes=100), path, arch="resnet8")


def test_file_without_weights_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "meta_only.pth"
    torch.save({"epoch": 3, "best_acc": 70.0}, path)
    with pytest.raises(CheckpointError, match=r"no model weights found.*\['best_acc', 'epoch'\]"):
        load_weights_strict(models.build_model("resnet8"), path, arch="resnet8")


@pytest.mark.parametrize("damage", ["empty", "half", "missing"])
def test_damaged_files_name_path_and_cause(tmp_path: Path, weights: dict, damage: str) -> None:
    path = tmp_path / "teacher.pth"
    torch.save({"model": weights}, path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    expected = "does not exist" if damage == "missing" else "truncated or corrupted"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_file(path)
    assert str(path) in str(info.value)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "hook": random.Random}, path)
    with pytest.raises(CheckpointError, match=r"not plain data \(e\.g\. random\.Random\)") as info:
        load_file(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)  # not torch's advice to load it


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    atomic_save({"epoch": 1}, path)

    def failing_save(obj, handle) -> None:
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_atomic_write_gives_normal_permissions(tmp_path: Path) -> None:
    (tmp_path / "plain.txt").write_text("x")  # what open() gives under the current umask
    fileio.atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_rng_state_round_trip_is_plain_and_exact(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leave a cached gaussian in NumPy's state
    atomic_save({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = ([random.random() for _ in range(100)], np.random.standard_normal(100), torch.rand(100))
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert [random.random() for _ in range(100)] == expected[0]
    assert np.array_equal(np.random.standard_normal(100), expected[1])
    assert torch.equal(torch.rand(100), expected[2])


@pytest.mark.slow
def test_file_for_another_class_count_is_still_identified(tmp_path: Path) -> None:
    path = tmp_path / "wrn.pth"
    torch.save({"model": models.build_model("wrn_40_2", num_classes=100).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"matches architecture\(s\): wrn_40_2;"):
        load_weights_strict(models.build_model("resnet8", num_classes=10), path, arch="resnet8",
                            identify=lambda sd: identify_architectures(sd, 10))


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", bytes(range(256)) * 20])
def test_a_file_that_is_no_checkpoint_says_so_without_torchs_advice(tmp_path: Path, content: bytes) -> None:
    """A text file or random bytes given as a teacher: "not a checkpoint (or damaged)", never torch's advice to load
    it with weights_only=False, nor a KeyError traceback."""
    path = tmp_path / "teacher.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"not a checkpoint (or damaged): {path}") and "weights_only" not in message
    assert "\n" not in message


V2_FIXTURE = REPO_ROOT / "tests" / "data" / "v2_last.pth"




# ------------------------------------------------------------------------------------------------ verified files
@pytest.mark.parametrize("kind", DAMAGE)
def test_loading_verifies_the_checksum(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "state.pth"
    atomic_save({"weights": torch.linspace(0, 1, 4096), "epoch": 3}, path)
    assert stored_checksum(path) is not None and torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["state.pth"]  # no temporary file left
    damage(path, kind)
    if kind == "flip":  # what the checksum is for: torch.load alone reads the flipped byte silently
        assert not torch.equal(torch.load(path, weights_only=True)["weights"], torch.linspace(0, 1, 4096))
    reason = {"half": "truncated", "empty": "truncated", "flip": "checksum mismatch"}[kind]
    with pytest.raises(CheckpointError, match=reason) as info:
        load_file(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------ teacher file
def test_teacher_file_is_identified_by_its_content(tmp_path: Path) -> None:
    """Item 5: the checkpoint records the teacher file's SHA-256; the same file moved elsewhere resumes, a file
    with other content is refused."""
    torch.manual_seed(1)
    first = tmp_path / "a" / "teacher.pth"
    first.parent.mkdir()
    torch.save({"model": models.build_model("tiny_mlp", num_classes=10).state_dict()}, first)

    def config(teacher: Path, epochs: int) -> Any:
        data = dropout_config(tmp_path, "kd", epochs=epochs, method="kd", temperature={"name": "fixed"},
                              teacher={"name": "tiny_mlp", "checkpoint": str(teacher)})
        return load(data, tmp_path, f"kd{epochs}.yaml")

    run(config(first, 1))
    saved = torch.load(tmp_path / "kd" / "last.pth", weights_only=True)
    assert saved["teacher_sha256"] == file_sha256(first)
    moved = tmp_path / "b" / "renamed.pth"
    moved.parent.mkdir()
    shutil.move(first, moved)
    assert run(config(moved, 2), resume="auto")["epochs"] == 2
    torch.manual_seed(2)
    other = tmp_path / "c" / "teacher.pth"
    other.parent.mkdir()
    torch.save({"model": models.build_model("tiny_mlp", num_classes=10).state_dict()}, other)
    with pytest.raises(CheckpointError, match=r"teacher file .*teacher\.pth .* is not the one this run was trained"):
        run(config(other, 3), resume="auto")


# ------------------------------------------------------------------------------------------------ formats
def test_version_2_checkpoint_still_loads_and_resumes(tmp_path: Path) -> None:
    """A7: tests/data/v2_last.pth (one epoch of tiny_dropout_mlp written before checksums and mid-epoch state)
    loads with weights_only, resumes with --resume auto, and continues as an uninterrupted run."""
    raw = torch.load(V2_FIXTURE, weights_only=True)
    assert raw["version"] == 2 and raw["epoch"] == 1 and stored_checksum(V2_FIXTURE) is None
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(V2_FIXTURE, old / "last.pth")
    sections = {"student": {"name": "tiny_dropout_mlp"}, "logging": {"tensorboard": False, "progress_bar": False}}
    run(load(tiny_run_config(tmp_path, "old", epochs=2, **sections), tmp_path, "old.yaml"), resume="auto")
    run(load(tiny_run_config(tmp_path, "new", epochs=2, **sections), tmp_path, "new.yaml"))
    a, b = (torch.load(tmp_path / name / "last.pth", weights_only=True) for name in ("old", "new"))
    assert a["version"] == 3 and a["epoch"] == 2
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in b["trainable"])
    assert (old / "ckpt-e0001-s000005.pth").read_bytes() == V2_FIXTURE.read_bytes()  # kept in the series


def test_unknown_version_and_missing_checksum_are_refused(tmp_path: Path) -> None:
    state = load_run_checkpoint(V2_FIXTURE)
    atomic_save({**state, "version": 4}, tmp_path / "v4.pth")
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint version 4 \(supported: 1, 2, 3\)"):
        load_run_checkpoint(tmp_path / "v4.pth")
    torch.save(state, tmp_path / "unchecked.pth")  # version 3 written without the checksum
    with pytest.raises(CheckpointError, match="unchecked.pth is truncated or corrupted: its SHA-256 checksum is"):
        load_run_checkpoint(tmp_path / "unchecked.pth")
