"""What produced a result: the experiment's config hash, the code revision, the software and the hardware."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ctkd.keys import flatten_keys
from ctkd.schema import Config, config_to_dict

_REPO = Path(__file__).resolve().parents[1]


def experiment_hash(cfg: Config, varies_freely: Callable[[str], bool]) -> str:
    """SHA-256 of the keys that define the experiment (not where files live, how long, how it is logged or launched:
    `varies_freely(key)`), so the same experiment in two run directories, or resumed for more epochs, hashes alike."""
    keys = {key: value for key, value in flatten_keys(config_to_dict(cfg)).items() if not varies_freely(key)}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=list).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_revision(repo: Path = _REPO) -> str | None:
    """The checkout's commit, with '+dirty' when tracked files differ from it; None outside a git checkout."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    """'cuda: <the GPU's name>', or 'cpu: <the processor's model name>' (its architecture where that is unknown)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_model() or platform.processor() or platform.machine() or 'unknown'}"


def _cpu_model() -> str | None:
    """The processor's model name from /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def provenance(
    cfg: Config, *, varies_freely: Callable[[str], bool], device: torch.device, world_size: int,
    teacher_sha256: str | None,
) -> dict[str, Any]:
    """Everything results.json records about how it was produced."""
    return {
        "seed": cfg.seed,
        "config_sha256": experiment_hash(cfg, varies_freely),
        "git_revision": git_revision(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,  # the CUDA of a GPU run; none on a CPU
        "python": platform.python_version(),
        "device": device_name(device),
        "world_size": world_size,
        "teacher_sha256": teacher_sha256,
    }
