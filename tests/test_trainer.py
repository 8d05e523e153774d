"""ctkd/trainer end to end on CPU: outputs, the frozen teacher, resume errors, temperature modes, CLIs."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import ctkd.models as models
import eval as eval_cli
import train as train_cli
from conftest import REPO_ROOT, ctkd_config, load, tiny_run_config, train_epoch, write_yaml
from ctkd import teacher as teacher_module
from ctkd.build import build_experiment
from ctkd.config import ConfigError, config_from_dict, load_config
from ctkd.curricula import build_curriculum
from ctkd.distributed import DistributedContext
from ctkd.errors import UserError
from ctkd.integrity import CheckpointError
from ctkd.resume import RunDirectoryError
from ctkd.trainer import run


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ outputs
def test_ctkd_run_writes_every_output(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file), tmp_path)
    results = run(cfg)
    out = Path(cfg.output_dir)
    for name in ("config.yaml", "metrics.jsonl", "results.json", "last.pth", "best.pth"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert load_config(out / "config.yaml") == cfg  # the resolved config round-trips

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    lam = build_curriculum(cfg.curriculum)  # cosine, E_loops 2
    assert [lam(1), lam(2), lam(3)] == pytest.approx([0.5, 1.0, 1.0])
    assert lam(1) != 0.5  # cos(π/2)/2 in floating point: the log below must not show that noise
    assert [r["lambda"] for r in records] == [0.5, 1.0, 1.0]  # rounded to 12 significant digits
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.05, 0.005])  # decay after epoch 2
    for r in records:
        assert {"train_loss_ce", "train_loss_kd", "train_acc1", "train_acc5", "test_acc1", "test_acc5",
                "tau_mean", "tau_min", "tau_max", "tau_last", "epoch_time"} <= r.keys()
        assert 1.0 < r["tau_min"] <= r["tau_mean"] <= r["tau_max"] < 21.0
        assert r["train_loss"] == pytest.approx(r["train_loss_ce"] + r["train_loss_kd"])

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert results["best_acc1"] == max(r["test_acc1"] for r in records)
    assert records[results["best_epoch"] - 1]["test_acc1"] == results["best_acc1"]
    assert results["last_acc1"] == records[-1]["test_acc1"]
    assert results["final_tau"] == records[-1]["tau_last"]
    assert results["teacher_acc1"] is not None and 0.0 <= results["teacher_acc1"] <= 100.0


def test_checkpoint_holds_plain_state_without_teacher(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path)
    run(cfg)
    state = torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)  # plain types only
    expected = {"epoch", "trainable", "method_state", "optimizer", "lr_schedule", "best_acc1", "rng", "config"}
    assert expected <= state.keys()
    assert state["epoch"] == 1 and state["version"] == 3 and state["method_state"] == {}
    assert config_from_dict(state["config"], "ckpt") == cfg
    student_keys = {f"student.{key}" for key in models.build_model("resnet8", num_classes=10).state_dict()}
    assert set(state["trainable"]) == student_keys | {"temperature.raw"}  # no teacher weights anywhere


def test_teacher_stays_frozen_and_out_of_the_optimizer(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path)
    exp = build_experiment(cfg, DistributedContext())
    teacher = exp.distiller.teacher
    before = state_hash(teacher.state_dict())
    optimized = {id(p) for group in exp.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    temperature_group = [g for g in exp.optimizer.param_groups if g["name"] == "temperature"]
    assert len(temperature_group) == 1 and temperature_group[0]["params"][0] is exp.distiller.trainable.temperature.raw
    train_epoch(exp, cfg)
    assert not teacher.training
    assert state_hash(teacher.state_dict()) == before  # BN running stats included


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path: Path, teacher_file: Path) -> None:
    """A crash between the metrics line and the checkpoint must not leave epoch 2 logged twice."""
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=2), tmp_path)
    run(cfg)
    out = Path(cfg.output_dir)
    shutil.copy(out / "last.pth", tmp_path / "epoch2.pth")
    cfg3 = load(ctkd_config(tmp_path, teacher_file, epochs=3), tmp_path, "cfg3.yaml")
    run(cfg3, resume="auto")
    # Pretend the run died right after logging epoch 3, before its checkpoint: resume from epoch 2's file.
    shutil.copy(tmp_path / "epoch2.pth", out / "last.pth")
    run(cfg3, resume=str(out / "last.pth"))
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("test/acc1")] == [1, 2, 3]


SYNTHETIC_KEYS = ("num_classes", "train_size", "test_size", "seed")


@pytest.mark.slow
def test_version_1_checkpoint_resumes_like_the_current_format(tmp_path: Path, teacher_file: Path) -> None:
    """A checkpoint written before methods had heads (separate student/temperature states, method as a string)."""
    cfg = load(ctkd_config(tmp_path, teacher_file, "v2", epochs=2), tmp_path, "v2.yaml")
    run(cfg)
    current = torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)
    trainable = current.pop("trainable")
    old = {
        **{k: v for k, v in current.items() if k != "method_state"}, "version": 1,
        "student": {k[len("student."):]: v for k, v in trainable.items() if k.startswith("student.")},
        "temperature": {k[len("temperature."):]: v for k, v in trainable.items() if k.startswith("temperature.")},
        "config": {**current["config"], "method": "kd", "output_dir": str(tmp_path / "v1")},
    }
    del old["config"]["temperature"]["adversarial"]  # keys added since then take their defaults
    data = old["config"]["data"]  # the synthetic dataset's keys were in their own subsection
    old["config"]["data"] = {**{k: v for k, v in data.items() if k not in SYNTHETIC_KEYS},
                             "synthetic": {k: data[k] for k in SYNTHETIC_KEYS}}
    (tmp_path / "v1").mkdir()
    torch.save(old, tmp_path / "v1" / "last.pth")
    longer = load(ctkd_config(tmp_path, teacher_file, "v1", epochs=3), tmp_path, "v1.yaml")
    run(longer, resume="auto")
    continued = load(ctkd_config(tmp_path, teacher_file, "v2", epochs=3), tmp_path, "v2.yaml")
    run(continued, resume="auto")
    a = torch.load(tmp_path / "v1" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "v2" / "last.pth", weights_only=True)
    assert a["version"] == 3 and state_hash(a["trainable"]) == state_hash(b["trainable"])


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    cfg = load(tiny_run_config(tmp_path, epochs=1), tmp_path)
    run(cfg)
    before = (Path(cfg.output_dir) / "last.pth").read_bytes()
    with pytest.raises(RunDirectoryError, match="--resume auto"):
        run(cfg)
    assert (Path(cfg.output_dir) / "last.pth").read_bytes() == before


def test_explicit_resume_of_missing_or_foreign_file_fails(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(tiny_run_config(tmp_path, epochs=1), tmp_path)
    with pytest.raises(CheckpointError, match="nope.pth"):
        run(cfg, resume=str(tmp_path / "nope.pth"))
    with pytest.raises(RuntimeError, match="not a ctkd run checkpoint"):
        run(cfg, resume=str(teacher_file))


# ------------------------------------------------------------------------------------------------ temperature modes
def test_instance_temperature_run_logs_per_sample_spread(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1, temperature={"name": "instance", "hidden_dim": 16}),
               tmp_path)
    run(cfg)
    record = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert 1.0 < record["tau_min"] < record["tau_max"] < 21.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cfg.output_dir)
    events.Reload()
    assert "params/tau" in events.Tags()["histograms"]


def test_fixed_temperature_is_plain_kd(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(tmp_path, teacher_file, epochs=1, temperature={"name": "fixed", "value": 4.0}), tmp_path)
    run(cfg)
    record = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert record["tau_min"] == record["tau_max"] == 4.0


# ------------------------------------------------------------------------------------------------ CLIs
def test_train_and_eval_cli(tmp_path: Path, teacher_file: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_yaml(tmp_path / "cli.yaml", ctkd_config(tmp_path, teacher_file, epochs=1))
    assert train_cli.main(["--config", str(path), "logging.tensorboard=false"]) == 0
    out = Path(tmp_path / "run")
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert eval_cli.main(["--config", str(path), "--checkpoint", str(out / "best.pth"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["acc1"] == results["best_acc1"] and metrics["acc5"] == results["best_acc5"]
    assert eval_cli.main(["--config", str(path), "--checkpoint", str(out / "best.pth")]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change,message",
    [
        ({"student": {"name": "resnet21"}}, "Unknown model 'resnet21'. Did you mean 'resnet32', 'resnet20'"),
        ({"data": {"name": "cifar100", "root": "MISSING_ROOT", "batch_size": 32}}, "MISSING_ROOT"),
        ({"optimizer": {"momentun": 0.9}}, "did you mean 'optimizer.momentum'"),
        ({"epochs": "3"}, "'epochs' expects int"),
        # found while the run is built, after its directory was claimed: it is taken back
        ({"method": "kd", "teacher": {"name": "resnet14", "checkpoint": "GARBAGE"}},
         "teacher.checkpoint: not a checkpoint (or damaged)"),
    ],
)
def test_train_cli_reports_bad_input_in_one_line_and_leaves_nothing(
    tmp_path: Path, change: dict, message: str, capsys: pytest.CaptureFixture
) -> None:
    data = tiny_run_config(tmp_path)
    for key, value in change.items():  # the data section is replaced whole: synthetic's keys are not cifar100's
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) and key != "data" else value
    if "teacher" in change:
        (tmp_path / "GARBAGE").write_bytes(bytes(range(256)) * 8)
        data["teacher"] = {"name": "resnet14", "checkpoint": str(tmp_path / "GARBAGE")}
    path = write_yaml(tmp_path / "bad.yaml", data)
    assert train_cli.main(["--config", str(path)]) == 1
    printed = capsys.readouterr().out
    # one message (a dataset's spans a few lines: the expected layout), never a traceback
    assert message.lower() in printed.lower() and " error: " in printed.splitlines()[0] and "Traceback" not in printed
    assert not (tmp_path / "run").exists()  # no output directory, no .lock


# ------------------------------------------------------------------------------------------------ quickstart
@pytest.mark.slow
def test_quickstart_trains_its_teacher_once_then_distils(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real quickstart configs, shortened to 2 epochs on fewer images, run from a fresh directory."""
    for name in ("quickstart.yaml", "quickstart_teacher.yaml"):
        data = yaml.safe_load((REPO_ROOT / "configs" / name).read_text())
        data.update(epochs=2)
        data["data"].update(train_size=320, test_size=100)
        write_yaml(tmp_path / "configs" / name, data)
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--config", "configs/quickstart.yaml"]) == 0
    teacher_run, student_run = tmp_path / "runs/quickstart_teacher", tmp_path / "runs/quickstart"
    assert (teacher_run / "best.pth").is_file() and (student_run / "results.json").is_file()
    teacher_bytes = (teacher_run / "best.pth").read_bytes()
    results = json.loads((student_run / "results.json").read_text())
    assert results["teacher_acc1"] == json.loads((teacher_run / "results.json").read_text())["best_acc1"]
    assert 1.0 < results["final_tau"] < 21.0
    # A second student run reuses the teacher instead of training it again.
    assert train_cli.main(["--config", "configs/quickstart.yaml", "output_dir=runs/again"]) == 0
    assert (teacher_run / "best.pth").read_bytes() == teacher_bytes
    assert json.loads((tmp_path / "runs/again/results.json").read_text())["best_acc1"] == results["best_acc1"]


# ------------------------------------------------------------------------------------------------ real CIFAR files
def test_cifar100_files_train_end_to_end_and_damage_is_reported(
    tmp_path: Path, teacher_file: Path, capsys: pytest.CaptureFixture
) -> None:
    """The cifar100 path on small files in the official pickle format: one epoch, then a truncated file."""
    from test_datasets import write_fake_cifar

    write_fake_cifar(tmp_path / "cifar", num_train=96, num_test=40)
    torch.manual_seed(5)
    teacher = tmp_path / "resnet14_100.pth"
    torch.save({"model": models.build_model("resnet14", num_classes=100).state_dict()}, teacher)
    data = ctkd_config(tmp_path, teacher, epochs=1, data={"name": "cifar100", "root": str(tmp_path / "cifar")})
    for key in ("num_classes", "train_size", "test_size", "seed"):  # synthetic's options
        del data["data"][key]
    path = write_yaml(tmp_path / "cifar.yaml", data)
    assert train_cli.main(["--config", str(path)]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 1

    train_file = tmp_path / "cifar" / "cifar-100-python" / "train"
    train_file.write_bytes(train_file.read_bytes()[:1000])
    capsys.readouterr()
    assert train_cli.main(["--config", str(path), "output_dir=" + str(tmp_path / "run2")]) == 1
    assert str(train_file) in capsys.readouterr().out
    assert not (tmp_path / "run2" / "last.pth").exists()


def test_non_finite_loss_stops_before_the_update(tmp_path: Path, teacher_file: Path) -> None:
    """A NaN teacher makes the KD term NaN: training stops with each term's value and writes no checkpoint."""
    state = torch.load(teacher_file, weights_only=True)
    state["model"]["fc.weight"] = torch.full_like(state["model"]["fc.weight"], float("nan"))
    nan_teacher = tmp_path / "nan_teacher.pth"
    torch.save(state, nan_teacher)
    cfg = load(ctkd_config(tmp_path, nan_teacher, epochs=1), tmp_path)
    expected = r"non-finite loss in step 1 of epoch 1 on rank\(s\) \[0\].*loss_kd=nan.*no checkpoint had been written"
    with pytest.raises(FloatingPointError, match=expected):
        run(cfg)
    assert not (Path(cfg.output_dir) / "last.pth").exists()


@pytest.mark.slow
def test_resume_refuses_config_changes_that_alter_the_experiment(tmp_path: Path, teacher_file: Path) -> None:
    run(load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path))
    changed = load(ctkd_config(tmp_path, teacher_file, epochs=2, optimizer={"lr": 0.1},
                               temperature={"name": "global", "init_raw": 0.0}), tmp_path, "changed.yaml")
    with pytest.raises(ConfigError, match=r"temperature\.init_raw: 1\.0 → 0\.0\n  optimizer\.lr: 0\.05 → 0\.1\n"):
        run(changed, resume="auto")
    longer = load(ctkd_config(tmp_path, teacher_file, epochs=2, data={"num_workers": 2}), tmp_path, "longer.yaml")
    assert run(longer, resume="auto")["epochs"] == 2  # more epochs and other workers continue the same run


def test_resume_survives_a_torn_last_metrics_line(tmp_path: Path, teacher_file: Path) -> None:
    run(load(ctkd_config(tmp_path, teacher_file, epochs=1), tmp_path))
    metrics = tmp_path / "run" / "metrics.jsonl"
    intact = metrics.read_text()
    with metrics.open("a") as handle:
        handle.write('{"epoch": 2, "lr": 0.0')  # killed in the middle of appending epoch 2
    run(load(ctkd_config(tmp_path, teacher_file, epochs=2), tmp_path, "more.yaml"), resume="auto")
    lines = metrics.read_text().splitlines()
    assert lines[0] == intact.strip() and [json.loads(x)["epoch"] for x in lines] == [1, 2]

    metrics.write_text(lines[0][:20] + "\n" + lines[1] + "\n")  # damage that is not a torn last line
    with pytest.raises(UserError, match=r"metrics\.jsonl, line 1: not a JSON record"):
        run(load(ctkd_config(tmp_path, teacher_file, epochs=3), tmp_path, "three.yaml"), resume="auto")


@pytest.mark.slow
def test_a_teacher_is_evaluated_once_per_teacher_file_and_test_split(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runs of a table share their teacher: the second run with the same teacher file and test split reads the
    first one's evaluation (the same numbers), another test split or another teacher file is evaluated again."""
    from ctkd.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # empty: other tests evaluated this teacher too
    evaluated = []
    real = teacher_module.evaluate

    def counting(model, *args, **kwargs):  # the teacher's evaluations (the student's go through ctkd.trainer)
        evaluated.append(1)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(teacher_module, "evaluate", counting)
    first = run(load(ctkd_config(tmp_path, teacher_file, "first", epochs=1), tmp_path, "first.yaml"))
    second = run(load(ctkd_config(tmp_path, teacher_file, "second", epochs=1, seed=1), tmp_path, "second.yaml"))
    assert len(evaluated) == 1 and second["teacher_acc1"] == first["teacher_acc1"]
    other_split = ctkd_config(tmp_path, teacher_file, "third", epochs=1, data={"test_size": 50})
    run(load(other_split, tmp_path, "third.yaml"))
    assert len(evaluated) == 2
    copy = tmp_path / "copy.pth"
    state = torch.load(teacher_file, weights_only=True)
    state["model"]["fc.bias"] = state["model"]["fc.bias"] + 1.0
    torch.save(state, copy)
    run(load(ctkd_config(tmp_path, copy, "fourth", epochs=1), tmp_path, "fourth.yaml"))
    assert len(evaluated) == 3


def test_a_run_says_what_it_is_about_to_do_in_one_block(
    tmp_path: Path, teacher_file: Path, capsys: pytest.CaptureFixture
) -> None:
    """Data (classes, images per split, where from), teacher (file, architecture, accuracy), student, processes and
    global batch, output directory: one block before the first epoch."""
    path = write_yaml(tmp_path / "c.yaml", ctkd_config(tmp_path, teacher_file, epochs=1))
    assert train_cli.main(["--config", str(path)]) == 0
    printed = capsys.readouterr().out
    block = printed.split("kd run of 1 epoch:\n", 1)[1].split("\n")[:6]
    assert block[0] == "  data      synthetic (generated): 10 classes, 160 training and 70 test images"
    assert block[1].startswith(f"  teacher   resnet14 from {teacher_file} (SHA-256 ") and "test top-1 " in block[1]
    assert block[2] == "  τ         global, λ curriculum cosine"
    assert block[3] == "  student   resnet8 from a random initialisation"
    assert block[4] == "  processes 1 on cpu, global batch 32, 5 steps per epoch"
    assert block[5] == f"  output    {tmp_path / 'run'} (a new run)"
    assert printed.index("kd run of 1 epoch:") < printed.index("epoch 1/1 ")


# ------------------------------------------------------------------------------------ evaluation and checkpoints
@pytest.mark.slow
def test_eval_and_checkpoint_intervals(tmp_path: Path) -> None:
    """eval_every 2 over 3 epochs: epochs 2 and 3 (the last) are evaluated; checkpoint_every 2: last.pth holds epoch
    2 until the last epoch writes it; a resume from it ends with the uninterrupted run's weights."""
    sections = dict(epochs=3, logging={"tensorboard": False, "progress_bar": False, "eval_every": 2,
                                       "checkpoint_every": 2})
    cfg = load(tiny_run_config(tmp_path, "spaced", **sections), tmp_path, "spaced.yaml")
    results = run(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert ["test_acc1" in r for r in records] == [False, True, True]
    assert results["last_acc1"] == records[-1]["test_acc1"]
    assert results["best_epoch"] in (2, 3)
    final = torch.load(Path(cfg.output_dir) / "last.pth", weights_only=True)
    assert final["epoch"] == 3

    short = load(tiny_run_config(tmp_path, "short", **{**sections, "epochs": 2}), tmp_path, "short.yaml")
    run(short)
    assert torch.load(Path(short.output_dir) / "last.pth", weights_only=True)["epoch"] == 2
    longer = load(tiny_run_config(tmp_path, "short", **sections), tmp_path, "short.yaml")
    run(longer, resume="auto")
    resumed = torch.load(Path(short.output_dir) / "last.pth", weights_only=True)
    assert all(torch.equal(resumed["trainable"][k], final["trainable"][k]) for k in final["trainable"])
