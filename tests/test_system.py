"""ctkd/system: compile mode resolution and the host allocator's tuning."""
from __future__ import annotations

import pytest
import torch

from ctkd.system import resolve_compile_mode

# ----------------------------------------------------------------------------------------------- host allocator
_FAULTS = """
import resource, sys, torch
import ctkd.models as models
from ctkd.system import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
torch.manual_seed(0)
torch.set_num_threads(1)
net = models.build_model("resnet8", num_classes=10)
x = torch.randn(32, 3, 32, 32)
def step():
    net.zero_grad()
    net(x).logsumexp(1).mean().backward()
step()  # the first step maps its memory either way
faults = []
for _ in range(6):  # the median step: a step's typical faults, not the odd one that maps something once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2])
"""


def test_compile_auto_is_on_for_cuda_only() -> None:
    assert resolve_compile_mode("auto", torch.device("cpu")) is None
    assert resolve_compile_mode("auto", torch.device("cuda", 0)) == "default"
    assert resolve_compile_mode("off", torch.device("cuda", 0)) is None
    assert resolve_compile_mode("reduce-overhead", torch.device("cpu")) == "reduce-overhead"


@pytest.mark.slow
def test_tune_malloc_keeps_freed_memory_for_reuse() -> None:
    """Without it glibc maps a step's activation buffers afresh each step (page faults); with it they are reused."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True)
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["default"] > 1000 and faults["tuned"] * 3 < faults["default"], faults  # ≈ 6k vs 0 here
