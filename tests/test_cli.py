"""A researcher's daily loop: own configs, input errors first, Ctrl-C, evaluation, inspection, readable logs."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import ctkd.models as models
import eval as eval_cli
import train as train_cli
from conftest import REPO_ROOT, ctkd_config, load, tiny_run_config, write_yaml
from ctkd import trainer
from ctkd.__main__ import main as ctkd_main
from ctkd.build import check_inputs
from ctkd.config import ConfigError, config_from_dict, default_output_dir, load_config
from ctkd.datasets import DatasetError
from ctkd.integrity import CheckpointError
from ctkd.logging import _tensorboard_tag
from ctkd.methods import METHODS
from ctkd.registry import UnknownNameError
from ctkd.resume import RunDirectoryError
from ctkd.trainer import run


# ------------------------------------------------------------------------------------------------ own configs
def test_output_dir_of_a_base_file_is_not_inherited(tmp_path: Path) -> None:
    base = tiny_run_config(tmp_path, "base_run")  # sets output_dir
    write_yaml(tmp_path / "configs" / "base.yaml", base)
    child = write_yaml(tmp_path / "configs" / "mine" / "child.yaml", {"_base_": "../base.yaml", "epochs": 1})
    assert load_config(child).output_dir == default_output_dir(child) == "runs/mine/child"
    assert load_config(child).epochs == 1 and load_config(child).student.name == base["student"]["name"]
    assert load_config(child, ["output_dir=elsewhere"]).output_dir == "elsewhere"
    own = write_yaml(tmp_path / "configs" / "own.yaml", {"_base_": "base.yaml", "output_dir": "runs/own"})
    assert load_config(own).output_dir == "runs/own"
    assert load_config(tmp_path / "configs" / "base.yaml").output_dir == base["output_dir"]


def test_quickstart_derived_configs_get_their_own_run_directory(tmp_path: Path) -> None:
    mine = write_yaml(tmp_path / "my_quickstart.yaml", {"_base_": str(REPO_ROOT / "configs/quickstart.yaml")})
    assert load_config(mine).output_dir == "runs/my_quickstart"
    assert load_config(REPO_ROOT / "configs/quickstart.yaml").output_dir == "runs/quickstart"


def test_occupied_directory_advises_resume_only_for_the_same_experiment(tmp_path: Path) -> None:
    cfg = load(tiny_run_config(tmp_path, epochs=1), tmp_path)
    run(cfg)
    with pytest.raises(RunDirectoryError, match="--resume auto"):
        run(cfg)
    longer = load(tiny_run_config(tmp_path, epochs=3), tmp_path)  # a resume may extend the run
    with pytest.raises(RunDirectoryError, match="--resume auto"):
        run(longer)
    other = load(tiny_run_config(tmp_path, epochs=1, optimizer={"lr": 0.2}), tmp_path)
    with pytest.raises(RunDirectoryError) as refused:
        run(other)
    message = str(refused.value)
    assert "different experiment" in message and "optimizer.lr" in message and "output_dir=" in message
    assert "--resume" not in message


# ------------------------------------------------------------------------------------------------ input errors first
@pytest.mark.parametrize(
    "change,error,text",
    [
        ({"student": {"name": "resnet9"}}, UnknownNameError, "Unknown model 'resnet9'"),
        ({"data": {"name": "cifar100", "root": "MISSING_ROOT"}}, DatasetError, "MISSING_ROOT"),
    ],
)
def test_input_errors_come_before_the_run_directory_check(
    tmp_path: Path, change: dict, error: type, text: str
) -> None:
    run(load(tiny_run_config(tmp_path, epochs=1), tmp_path))
    changed = tiny_run_config(tmp_path, epochs=1, **change)
    if changed["data"]["name"] == "cifar100":  # the synthetic dataset's own keys are not options of cifar100
        changed["data"] = {k: v for k, v in changed["data"].items() if k not in ("num_classes", "train_size",
                                                                                  "test_size", "seed")}
    with pytest.raises(error, match=text):
        run(load(changed, tmp_path))


def test_wrong_teacher_path_fails_before_any_teacher_is_trained(tmp_path: Path) -> None:
    teacher_config = write_yaml(
        tmp_path / "teacher.yaml", tiny_run_config(tmp_path, "teacher_run", student={"name": "resnet14"})
    )
    data = ctkd_config(tmp_path, tmp_path / "nope.pth")
    data["teacher"]["train_config"] = str(teacher_config)
    with pytest.raises(ConfigError) as refused:
        run(load(data, tmp_path))
    assert "nope.pth" in str(refused.value) and str(tmp_path / "teacher_run" / "best.pth") in str(refused.value)
    assert not (tmp_path / "teacher_run").exists()  # nothing was trained or resumed


def test_teacher_config_must_train_the_named_teacher(tmp_path: Path) -> None:
    teacher_config = write_yaml(tmp_path / "teacher.yaml", tiny_run_config(tmp_path, "teacher_run"))  # resnet8
    data = ctkd_config(tmp_path, tmp_path / "teacher_run" / "best.pth")  # teacher.name resnet14
    data["teacher"]["train_config"] = str(teacher_config)
    with pytest.raises(ConfigError, match="trains resnet8, but teacher.name is resnet14"):
        run(load(data, tmp_path))


def test_missing_teacher_advice_names_only_configs_that_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the shipped teacher configs are looked up where users run from
    missing = tmp_path / "none.pth"
    shipped = load(ctkd_config(tmp_path, missing, teacher={"name": "resnet56"}), tmp_path)
    with pytest.raises(CheckpointError, match=r"none\.pth does not exist.*configs/cifar100/teachers/resnet56\.yaml"):
        check_inputs(shipped)
    unshipped = load(ctkd_config(tmp_path, missing), tmp_path)  # resnet14: no shipped teacher config
    with pytest.raises(CheckpointError) as refused:
        check_inputs(unshipped)
    assert "teachers/resnet14.yaml" not in str(refused.value)
    assert "student.name=resnet14" in str(refused.value)


# ------------------------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_command_that_continues(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = write_yaml(tmp_path / "cfg.yaml", ctkd_config(tmp_path, teacher_file))
    real_train = trainer.Trainer.train_epoch

    def ctrl_c_in_epoch_2(self, epoch_run, *args, **kwargs):
        if epoch_run.epoch == 2:
            raise KeyboardInterrupt
        return real_train(self, epoch_run, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "train_epoch", ctrl_c_in_epoch_2)
    argv = ["--config", str(path), "logging.tensorboard=false"]
    assert train_cli.main(argv) == 130
    out = capsys.readouterr().out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    lines = [line for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "last.pth holds epoch 1" in lines[0]
    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[:2] == ["python", "train.py"] and command[-2:] == ["--resume", "auto"]
    monkeypatch.setattr(trainer.Trainer, "train_epoch", real_train)
    assert train_cli.main(command[2:]) == 0  # the printed command finishes the run
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 3


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = write_yaml(tmp_path / "cfg.yaml", tiny_run_config(tmp_path))

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "train_epoch", ctrl_c)
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    assert train_cli.main(["--config", str(path)]) == 130
    assert "interrupted before anything was saved" in capsys.readouterr().out
    # main() called from Python leaves the process's handlers as they were (processes it starts later inherit them)
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> Path:
    """A finished 1-epoch CTKD run directory."""
    tmp_path = tmp_path_factory.mktemp("finished")
    run(load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path))
    return tmp_path / "run"


def test_eval_reads_the_config_from_our_checkpoint(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    assert eval_cli.main(["--checkpoint", str(finished_run / "best.pth"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (metrics["acc1"], metrics["acc5"]) == (results["best_acc1"], results["best_acc5"])
    assert eval_cli.main(["--checkpoint", str(finished_run / "best.pth"), "data.test_batch_size=7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc1"] == results["best_acc1"]
    assert eval_cli.main(["--checkpoint", str(finished_run / "best.pth"), "data.test_batch_size=x"]) == 1
    assert "data.test_batch_size" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_of_a_teacher_file_names_the_key_to_set(
    tmp_path: Path, teacher_file: Path, finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    assert eval_cli.main(["--checkpoint", str(teacher_file)]) == 1
    out = capsys.readouterr().out
    assert "not a ctkd run checkpoint" in out and "--config" in out and "student.name=resnet14" in out
    config = str(finished_run / "config.yaml")  # student resnet8
    assert eval_cli.main(["--config", config, "--checkpoint", str(teacher_file)]) == 1
    out = capsys.readouterr().out
    assert "does not match architecture 'resnet8'" in out and "set student.name=resnet14" in out
    assert eval_cli.main(["--config", config, "--checkpoint", str(teacher_file), "student.name=resnet14"]) == 0


# ------------------------------------------------------------------------------------------------ inspection
def test_print_config_prints_the_resolved_config_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = tiny_run_config(tmp_path)
    del data["output_dir"]
    path = write_yaml(tmp_path / "configs" / "mine.yaml", data)
    assert train_cli.main(["--config", str(path), "--print-config", "epochs=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 5 and printed["output_dir"] == "runs/mine"
    assert config_from_dict(printed, "printed") == load_config(path, ["epochs=5"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]  # no run directory, no data


@pytest.mark.parametrize("kind,expected", [
    ("models", {"resnet8", "resnet56", "wrn_40_2", "ShuffleV2"}),
    ("methods", {"vanilla", "kd", "dkd", "pkt", "sp", "vid", "crd", "srrl", "rkd"}),
    ("temperatures", {"fixed", "global", "instance"}),
    ("curricula", {"cosine", "linear", "constant"}),
    ("datasets", {"cifar100", "synthetic"}),
])
def test_list_prints_the_registered_names(kind: str, expected: set, capsys: pytest.CaptureFixture) -> None:
    assert ctkd_main(["list", kind]) == 0
    assert expected <= set(capsys.readouterr().out.split())


@pytest.mark.slow
def test_python_dash_m_ctkd_runs_from_the_repository_root() -> None:
    done = subprocess.run([sys.executable, "-m", "ctkd", "list", "methods"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == METHODS.explicit_names()
    assert "crd" in METHODS.explicit_names() and "vanilla" in METHODS.explicit_names()


def test_list_methods_shows_each_methods_paper_and_needs(capsys: pytest.CaptureFixture) -> None:
    assert ctkd_main(["list", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "Zhao et al., CVPR 2022" in lines["dkd"] and lines["dkd"].endswith("needs teacher logits, τ inside its loss")
    assert lines["crd"].endswith("needs teacher logits, features")
    assert lines["vanilla"].endswith("needs no teacher")


# ------------------------------------------------------------------------------------------------ readable logs
def test_vanilla_run_logs_no_lambda_and_labels_accuracies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_yaml(tmp_path / "cfg.yaml", tiny_run_config(tmp_path, epochs=1))
    assert train_cli.main(["--config", str(path)]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "lambda" not in record and "tau_last" not in record
    line = next(line for line in capsys.readouterr().out.splitlines() if "epoch 1/1" in line)
    assert "λ" not in line and "τ" not in line
    assert f"test top-1 {record['test_acc1']:.2f}% top-5 {record['test_acc5']:.2f}%" in line


def test_ctkd_console_shows_the_last_batch_tau_that_results_report(
    tmp_path: Path, teacher_file: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_yaml(tmp_path / "cfg.yaml", ctkd_config(tmp_path, teacher_file, epochs=2))
    assert train_cli.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    line = next(line for line in capsys.readouterr().out.splitlines() if "epoch 2/2" in line)
    assert f"τ {results['final_tau']:.3f} (epoch mean {records[-1]['tau_mean']:.3f})" in line
    assert f"λ {records[-1]['lambda']:.4f}" in line


def test_metrics_floats_carry_no_noise_and_time_is_not_a_param(tmp_path: Path) -> None:
    run(load(tiny_run_config(tmp_path, epochs=3, optimizer={"lr": 0.05, "lr_decay_epochs": [1, 2]}), tmp_path))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0.05 * 0.1 * 0.1 != 0.0005  # the schedule's product is noisy in binary floating point ...
    assert lrs == [0.05, 0.005, 0.0005]  # ... the log is not
    assert _tensorboard_tag("epoch_time") == "time/epoch_s" and _tensorboard_tag("tau_last") == "params/tau_last"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet56", "resnet14"])
def test_eval_of_a_bare_weights_file_suggests_only_a_config_that_exists(tmp_path: Path, arch: str) -> None:
    """resnet56 has a shipped teacher config; resnet14 has none, so the example names a file that exists instead."""
    from ctkd.evaluation import config_of_checkpoint

    path = tmp_path / f"{arch}.pth"
    torch.save({"model": models.build_model(arch, num_classes=100).state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        config_of_checkpoint(path)
    example = str(info.value).split("eval.py --config ", 1)[1].split(" ", 1)[0]
    assert (REPO_ROOT / example).is_file(), example
    assert example.endswith(f"teachers/{arch}.yaml") == (arch == "resnet56")
