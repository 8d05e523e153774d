"""results.json says what produced it: seed, experiment hash, code revision, software, device, teacher file."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import torch

from conftest import ctkd_config, load, tiny_run_config
from ctkd.provenance import experiment_hash, git_revision
from ctkd.resume import resumable
from ctkd.trainer import run


def test_results_record_their_provenance(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1, seed=3), tmp_path)
    run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["seed"] == 3 and results["world_size"] == 1 and results["torch"] == torch.__version__
    assert results["teacher_sha256"] == hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    assert results["config_sha256"] == experiment_hash(cfg, resumable) and len(results["config_sha256"]) == 64
    assert results["git_revision"] == git_revision()
    assert isinstance(results["device"], str) and results["device"]
    if not torch.cuda.is_available():  # a CPU run says so: the processor's name, and no CUDA version
        assert results["device"].startswith("cpu: ") and results["cuda"] is None
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if "model name" in cpuinfo:
            model = next(line for line in cpuinfo.splitlines() if line.startswith("model name")).split(":", 1)[1]
            assert results["device"] == f"cpu: {model.strip()}"
    vanilla = load(tiny_run_config(tmp_path, "plain", epochs=1), tmp_path, "plain.yaml")
    assert run(vanilla)["teacher_sha256"] is None


def test_experiment_hash_ignores_paths_and_length_but_not_the_experiment(tmp_path: Path, teacher_file: Path) -> None:
    base = load(ctkd_config(tmp_path, teacher_file, "a"), tmp_path, "a.yaml")
    moved = load(ctkd_config(tmp_path, teacher_file, "b", epochs=9, data={"num_workers": 2}), tmp_path, "b.yaml")
    other_lr = load(ctkd_config(tmp_path, teacher_file, "a", optimizer={"lr": 0.2}), tmp_path, "c.yaml")
    other_seed = load(ctkd_config(tmp_path, teacher_file, "a", seed=1), tmp_path, "d.yaml")
    assert experiment_hash(base, resumable) == experiment_hash(moved, resumable)
    assert len({experiment_hash(c, resumable) for c in (base, other_lr, other_seed)}) == 3


def test_git_revision_names_the_commit_and_marks_local_changes(tmp_path: Path) -> None:
    assert git_revision(tmp_path) is None  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (repo / "f.txt").write_text("1")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = git("rev-parse", "HEAD").strip()
    assert git_revision(repo) == commit
    (repo / "f.txt").write_text("2")
    assert git_revision(repo) == commit + "+dirty"
