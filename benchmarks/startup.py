"""Where a run's start-up goes: the phases of `python train.py` from interpreter start to the first epoch's end.

    python benchmarks/startup.py --config FILE [KEY=VALUE ...] [--repeat 2]

Each repeat is a fresh process (as the table runner starts every run), timed phase by phase: the imports of the
training stack, reading the config, checking the inputs, building the experiment (data, networks, teacher),
evaluating the teacher (cached after the first run of a teacher file: ctkd.cache), the epochs and writing the
results. Run it from the repository root; it trains into a temporary directory and leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in the child process: wraps the trainer's phases with timers, then trains as train.py does.
CHILD = r"""
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, {root!r})
from ctkd.config import load_config
imported_config = time.perf_counter()
import ctkd.trainer as trainer
imported = time.perf_counter()
phases = {{"import ctkd.config": imported_config - start, "import the training stack": imported - imported_config}}

def timed(name, function):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - began
    return wrapper

for name, owner, attribute in (("check the inputs", trainer, "check_inputs"),
                               ("build the experiment", trainer, "build_experiment"),
                               ("evaluate the teacher", trainer, "evaluate_teacher"),
                               ("train and evaluate the epochs", trainer.Trainer, "run_epoch")):
    setattr(owner, attribute, timed(name, getattr(owner, attribute)))
began = time.perf_counter()
cfg = load_config({config!r}, {overrides!r})
phases["read the config"] = time.perf_counter() - began
began = time.perf_counter()
trainer.run(cfg)
phases["the whole run() call"] = time.perf_counter() - began
print(json.dumps(phases))
"""


def run_once(config: str, overrides: list[str], cache: Path) -> dict[str, float]:
    """One fresh process: its phases and its wall time from exec to exit."""
    with tempfile.TemporaryDirectory() as out:
        code = CHILD.format(root=str(REPO_ROOT), config=config, overrides=[*overrides, f"output_dir={out}/run"])
        env = {**os.environ, "CTKD_CACHE_DIR": str(cache)}
        began = __import__("time").perf_counter()
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        wall = __import__("time").perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"the run failed:\n{done.stdout}\n{done.stderr}")
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    return {**phases, "process wall time": wall}


def main() -> int:
    """Print a Markdown table of the phases of `--repeat` fresh runs (the first one evaluates the teacher)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        runs = [run_once(args.config, args.overrides, Path(cache)) for _ in range(args.repeat)]
    names = list(runs[0])
    print(f"Start-up of `python train.py --config {args.config} {' '.join(args.overrides)}` (seconds, fresh processes;"
          " run 1 evaluates the teacher, later runs read it from the cache):\n")
    print("| phase | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{run.get(name, 0.0):.2f}" for run in runs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
