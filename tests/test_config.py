"""ctkd.config: YAML loading (_base_, overrides, YAML 1.2), strict schema errors, round trips."""
from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from ctkd.config import (
    Config,
    ConfigError,
    DataOptions,
    OptimizerConfig,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_config,
    save_config,
)

TEACHER = "teacher: {name: resnet56, checkpoint: ckpts/resnet56.pth}\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), name: str = "exp.yaml") -> Config:
    """Load `text` (a kd config unless it sets its own method/teacher) from tmp_path/name."""
    return load_config(write(tmp_path, name, TEACHER + textwrap.dedent(text)), overrides)


def error_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), name: str = "exp.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, overrides, name)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------- defaults


def test_defaults_are_the_authors_protocol_and_round_trip(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    expected = Config(output_dir="runs/exp", teacher=dataclasses.replace(Config().teacher, name="resnet56",
                                                                         checkpoint="ckpts/resnet56.pth"))
    assert cfg == expected
    assert (cfg.method.name, cfg.epochs, cfg.seed, cfg.device) == ("kd", 240, 0, "auto")
    assert cfg.optimizer == OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4,
                                            lr_decay_epochs=(150, 180, 210), lr_decay_rate=0.1)
    assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (0.1, 0.9)
    assert (cfg.temperature.name, cfg.temperature.t_start, cfg.temperature.t_range) == ("global", 1.0, 20.0)
    assert (cfg.curriculum.name, cfg.curriculum.loops) == ("cosine", 10)
    assert cfg.data.effective_test_batch_size == 32

    data = config_to_dict(cfg)
    assert data["optimizer"]["lr_decay_epochs"] == [150, 180, 210]  # plain list, not a tuple
    assert json.loads(json.dumps(data)) == data
    assert config_from_dict(data, "checkpoint last.pth") == cfg


def test_effective_test_batch_size() -> None:
    assert DataOptions(batch_size=65).effective_test_batch_size == 32
    assert DataOptions(batch_size=1).effective_test_batch_size == 1
    assert DataOptions(batch_size=64, test_batch_size=100).effective_test_batch_size == 100


def test_direct_construction_is_validated_and_frozen() -> None:
    assert OptimizerConfig(lr=1, lr_decay_epochs=[5, 9]) == OptimizerConfig(lr=1.0, lr_decay_epochs=(5, 9))
    assert isinstance(OptimizerConfig(lr=1).lr, float)
    with pytest.raises(ConfigError, match=r"OptimizerConfig.lr must be > 0, got 0.0"):
        OptimizerConfig(lr=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        OptimizerConfig().lr = 0.1  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------------ _base_


def test_base_single_merges_nested_sections(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", """\
        epochs: 100
        optimizer: {lr: 0.1, momentum: 0.8}
    """)
    cfg = load_text(tmp_path, "_base_: base.yaml\noptimizer: {momentum: 0.95}\n")
    assert cfg.epochs == 100
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.1, 0.95)


def test_base_list_later_wins_and_lists_replace(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", """\
        epochs: 10
        seed: 1
        optimizer: {lr: 0.1, weight_decay: 0.001, lr_decay_epochs: [1, 2, 3]}
    """)
    write(tmp_path, "b.yaml", """\
        epochs: 20
        optimizer: {lr: 0.2, lr_decay_epochs: [5]}
    """)
    cfg = load_text(tmp_path, "_base_: [a.yaml, b.yaml]\noptimizer: {lr: 0.3}\n")
    assert (cfg.epochs, cfg.seed) == (20, 1)  # b over a; a's other keys kept
    assert cfg.optimizer.lr == 0.3  # the file itself over its bases
    assert cfg.optimizer.weight_decay == 0.001  # nested merge keeps a's key
    assert cfg.optimizer.lr_decay_epochs == (5,)  # lists replace, never concatenate


def test_base_paths_are_relative_to_the_including_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "configs/common/root.yaml", "epochs: 7\nseed: 3\n")
    write(tmp_path, "configs/common/cifar.yaml", "_base_: root.yaml\ndata: {batch_size: 128}\nseed: 4\n")
    exp = write(tmp_path, "configs/cifar100/exp.yaml", TEACHER + "_base_: ../common/cifar.yaml\n")
    monkeypatch.chdir(tmp_path / "configs" / "common")  # the cwd must not matter
    cfg = load_config(exp)
    assert (cfg.epochs, cfg.seed, cfg.data.batch_size) == (7, 4, 128)


def test_base_shared_by_two_bases_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path, "root.yaml", "epochs: 7\n")
    write(tmp_path, "a.yaml", "_base_: root.yaml\nseed: 1\n")
    write(tmp_path, "b.yaml", "_base_: root.yaml\ndata: {batch_size: 32}\n")
    cfg = load_text(tmp_path, "_base_: [a.yaml, b.yaml]\n")
    assert (cfg.epochs, cfg.seed, cfg.data.batch_size) == (7, 1, 32)


def test_base_cycle_is_an_error_naming_the_chain(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml")
    message = str(info.value)
    assert "_base_ cycle" in message
    assert f"{tmp_path}/a.yaml → {tmp_path}/b.yaml → {tmp_path}/a.yaml" in message


def test_missing_base_and_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, "_base_: nowhere.yaml\n")
    assert f"{tmp_path}/exp.yaml: _base_ file '{tmp_path}/nowhere.yaml' cannot be read" in message
    with pytest.raises(ConfigError, match="config file '.*absent.yaml' cannot be read"):
        load_config(tmp_path / "absent.yaml")
    assert "'_base_' must be a path or a list of paths, got int 3" in error_of(tmp_path, "_base_: 3\n")


def test_error_in_a_base_names_the_base_file(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "optimizer: {lr: 0}\nepochs: 5\n")
    message = error_of(tmp_path, "_base_: base.yaml\nepochs: 0\n")
    assert f"{tmp_path}/base.yaml: 'optimizer.lr' must be > 0, got 0.0" in message
    assert f"{tmp_path}/exp.yaml: 'epochs' must be >= 1, got 0" in message  # the file's own value wins
    assert message.startswith("2 config errors:")


# --------------------------------------------------------------------------------------------------------- overrides


def test_overrides_scalar_list_null_nested_and_string(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "temperature: {lr: 0.01}\ndata: synthetic\n", (
        "optimizer.lr=0.1",
        "optimizer.weight_decay=1e-4",
        "optimizer.lr_decay_epochs=[30,60]",
        "temperature.lr=null",
        "data.num_classes=5",
        "data.root=/data/cifar",
        "logging.tensorboard=false",
    ))
    assert cfg.optimizer.lr == 0.1 and cfg.optimizer.weight_decay == 0.0001
    assert cfg.optimizer.lr_decay_epochs == (30, 60)
    assert cfg.temperature.lr is None
    assert cfg.data.num_classes == 5 and cfg.data.train_size == 2000
    assert cfg.data.root == "/data/cifar"
    assert cfg.logging.tensorboard is False


def test_overrides_apply_after_files_in_order(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "epochs: 5\n", ("epochs=6", "epochs=7"))
    assert cfg.epochs == 7


def test_override_without_equals_shows_the_expected_form(tmp_path: Path) -> None:
    for item in ("optimizer.lr", "=3", "optimizer..lr=3"):
        message = error_of(tmp_path, "", (item,))
        assert f"override '{item}' must look like KEY=VALUE" in message
        assert "'optimizer.lr=0.1'" in message


def test_override_is_as_strict_as_a_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", ("optimizer.momentun=0.8",))
    assert message.startswith("command-line override 'optimizer.momentun=0.8': unknown key 'optimizer.momentun'.")
    assert "Did you mean 'optimizer.momentum'?" in message
    message = error_of(tmp_path, "", ("epochs=abc",))
    assert message == ("command-line override 'epochs=abc': 'epochs' expects int, got str 'abc'; "
                       "write a whole number")
    message = error_of(tmp_path, "", ("logging.tensorboard=yes",))
    assert "command-line override 'logging.tensorboard=yes': 'logging.tensorboard' expects bool" in message


def test_override_replacing_a_section_with_a_scalar(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", ("data=5",))
    assert message.startswith("command-line override 'data=5': 'data' is a section and must be a mapping")


# ------------------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize("text, key, suggestion, valid", [
    ("epoch: 10\n", "epoch", "epochs", "Valid keys at top level: output_dir, seed, device, method, epochs,"),
    ("optimizer: {momentun: 0.9}\n", "optimizer.momentun", "optimizer.momentum",
     "Valid keys in 'optimizer': lr, momentum, weight_decay, lr_decay_epochs, lr_decay_rate"),
    ("data:\n  name: synthetic\n  num_clases: 5\n", "data.num_clases", "data.num_classes",
     "Valid keys in 'data': name, root, download, batch_size, test_batch_size, num_workers, num_classes, "
     "train_size, test_size, seed"),
])
def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path, text: str, key: str, suggestion: str,
                                                   valid: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path}/exp.yaml: unknown key '{key}'. Did you mean '{suggestion}'? {valid}")


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    message = error_of(tmp_path, "zzz: 1\n")
    assert "unknown key 'zzz'. Valid keys at top level:" in message and "Did you mean" not in message


# ------------------------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize("text, expected", [
    ('epochs: "240"\n', "'epochs' expects int, got str '240'; remove the quotes"),
    ("optimizer: {lr: [0.1]}\n", "'optimizer.lr' expects float, got list [0.1]; write a number"),
    ("logging: {tensorboard: maybe}\n", "'logging.tensorboard' expects bool (true/false), got str 'maybe'; "
                                        "use true or false"),
    ("logging: {tensorboard: yes}\n", "'logging.tensorboard' expects bool (true/false), got str 'yes'"),
    ("logging: {progress_bar: off}\n", "'logging.progress_bar' expects bool (true/false), got str 'off'"),
    ("epochs: true\n", "'epochs' expects int, got bool true"),
    ("epochs: 2.5e2\n", "'epochs' expects int, got float 250.0; write a whole number"),
    ("data: {root: null}\n", "'data.root' expects str, got null; set a value (null is not allowed here)"),
    ("data: {root: 5}\n", "'data.root' expects str, got int 5; quote it"),
    ("data: {test_batch_size: '8'}\n", "'data.test_batch_size' expects int or null, got str '8'; remove the quotes"),
    ("optimizer: {lr_decay_epochs: 30}\n", "'optimizer.lr_decay_epochs' expects list of int, got int 30; "
                                           "write a YAML list such as [150, 180, 210]"),
    ("optimizer: {lr_decay_epochs: [30, '60']}\n",
     "'optimizer.lr_decay_epochs' expects list of int, got list [30, '60'] (item 1 is str '60')"),
    ("data: 5\n", "'data' is a section and must be a mapping of keys, got int 5; write its keys indented under "
                  "'data:' (valid keys in 'data': name, root, download,"),
    ("student: null\n", "'student' is a section and must be a mapping of keys, got null"),
])
def test_wrong_type_names_key_expected_type_and_value(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path}/exp.yaml: ") and expected in message


def test_int_is_accepted_for_float_and_null_for_optional(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "optimizer: {lr: 1}\ndata: {test_batch_size: null}\ntemperature: {weight_decay: 0}\n")
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.test_batch_size is None
    assert cfg.temperature.weight_decay == 0.0 and isinstance(cfg.temperature.weight_decay, float)


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'epochs: "240"\noptimizer: {lr: [0.1], momentun: 0.9}\n')
    assert message.startswith("3 config errors:\n")
    for part in ("'epochs' expects int", "'optimizer.lr' expects float", "unknown key 'optimizer.momentun'"):
        assert part in message


# ------------------------------------------------------------------------------------------------ YAML 1.1 traps


def test_duplicate_key_names_file_key_and_both_lines(tmp_path: Path) -> None:
    message = error_of(tmp_path, """\
        optimizer:
          lr: 0.1
          momentum: 0.9
          lr: 0.2
    """)
    # TEACHER takes line 1, so the two `lr` keys are on lines 3 and 5
    assert message.startswith(f"{tmp_path}/exp.yaml: duplicate key 'lr' at line 3 and line 5;")


def test_duplicate_key_in_an_override(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", ("optimizer={lr: 0.1, lr: 0.2}",))
    assert "command-line override 'optimizer={lr: 0.1, lr: 0.2}': duplicate key 'lr'" in message


def test_yaml12_floats(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "optimizer: {lr: 1e-3, weight_decay: 5e-4}\n"
                              "temperature: {init_raw: -2E+5, t_range: 1.0e1}\n")
    assert cfg.optimizer.lr == 0.001 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.weight_decay == 0.0005
    assert cfg.temperature.init_raw == -200000.0
    assert cfg.temperature.t_range == 10.0


def test_yaml12_booleans(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "logging: {tensorboard: FALSE, progress_bar: False}\n"
                              "data: {download: TRUE, root: yes}\n")
    assert cfg.logging.tensorboard is False and cfg.logging.progress_bar is False
    assert cfg.data.download is True
    assert cfg.data.root == "yes"  # a string field keeps `yes` as the string it is in YAML 1.2


def test_global_safe_loader_is_untouched(tmp_path: Path) -> None:
    load_text(tmp_path, "optimizer: {lr: 1e-3}\n")
    assert yaml.safe_load("a: 1e-3\nb: yes") == {"a": "1e-3", "b": True}
    assert yaml.safe_load("a: 1\na: 2") == {"a": 2}


@pytest.mark.parametrize("text, key", [
    ("optimizer: {lr: .nan}\n", "optimizer.lr"),
    ("optimizer: {lr: .inf}\n", "optimizer.lr"),
    ("temperature: {init_raw: -.inf}\n", "temperature.init_raw"),
    ("loss: {kd_weight: .NaN}\n", "loss.kd_weight"),
])
def test_non_finite_floats_are_rejected(tmp_path: Path, text: str, key: str) -> None:
    assert f"'{key}' must be a finite number, got " in error_of(tmp_path, text)


# ------------------------------------------------------------------------------------------------------------ ranges


@pytest.mark.parametrize("text, expected", [
    ("optimizer: {lr: 0}\n", "'optimizer.lr' must be > 0, got 0.0"),
    ("optimizer: {lr: -0.1}\n", "'optimizer.lr' must be > 0, got -0.1"),
    ("epochs: 0\n", "'epochs' must be >= 1, got 0"),
    ("seed: -1\n", "'seed' must be >= 0, got -1"),
    ("loss: {ce_weight: -0.5}\n", "'loss.ce_weight' must be >= 0, got -0.5"),
    ("optimizer: {momentum: 1.0}\n", "'optimizer.momentum' must be in [0, 1), got 1.0"),
    ("optimizer: {lr_decay_epochs: [60, 30]}\n",
     "'optimizer.lr_decay_epochs' must be strictly increasing, got [60, 30]; sort it and drop repeats"),
    ("optimizer: {lr_decay_epochs: [30, 30]}\n", "'optimizer.lr_decay_epochs' must be strictly increasing"),
    ("optimizer: {lr_decay_epochs: [0, 30]}\n", "'optimizer.lr_decay_epochs' each item must be >= 1, got [0, 30]"),
    ("temperature: {name: fixed, value: 0}\n", "'temperature.value' must be > 0, got 0.0"),
    ("temperature: {lr: 0}\n", "'temperature.lr' must be > 0, got 0.0"),
    ("data: {batch_size: 0}\n", "'data.batch_size' must be >= 1, got 0"),
    ("data: {name: synthetic, num_classes: 1}\n", "'data.num_classes' must be >= 2, got 1"),
    ("curriculum: {lambda_min: -1}\n", "'curriculum.lambda_min' must be >= 0, got -1.0"),
])
def test_out_of_range_names_key_range_and_value(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path}/exp.yaml: ") and expected in message


@pytest.mark.parametrize("text, expected", [
    ("method: kdd\n", "exp.yaml: 'method.name': Unknown method 'kdd'. Did you mean 'kd', "),
    ("temperature: {name: globel}\n",
     "exp.yaml: 'temperature.name': Unknown temperature 'globel'. Did you mean 'global'?"),
    ("curriculum: {name: cos}\n", "exp.yaml: 'curriculum.name': Unknown curriculum 'cos'. Did you mean 'cosine'"),
    ("data: {name: cifar10}\n", "exp.yaml: 'data.name': Unknown dataset 'cifar10'. Did you mean 'cifar100'"),
    ("device: gpu\n", "'device' must be one of auto, cpu, cuda; got 'gpu'."),
])
def test_bad_choice_lists_choices_with_suggestion(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


# ---------------------------------------------------------------------------------------------------- cross-field


def test_lambda_max_below_lambda_min(tmp_path: Path) -> None:
    message = error_of(tmp_path, "curriculum: {lambda_min: 0.8, lambda_max: 0.5}\n")
    assert message == (f"{tmp_path}/exp.yaml: 'curriculum.lambda_max' (0.5) must be >= 'curriculum.lambda_min' "
                       "(0.8); raise lambda_max or lower lambda_min")


def test_kd_requires_a_teacher(tmp_path: Path) -> None:
    path = write(tmp_path, "kd.yaml", "teacher: {name: resnet56}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{tmp_path}/kd.yaml: method: kd needs teacher.name and teacher.checkpoint, but teacher.checkpoint is not set; "
        "set it, or use method: vanilla to train without a teacher"
    )
    message = error_of(tmp_path, "", ("teacher.name=null", "teacher.checkpoint=null"))
    assert "but teacher.name and teacher.checkpoint are not set" in message


def test_vanilla_rejects_teacher_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "vanilla.yaml", "method: vanilla\nteacher: {name: resnet56}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{tmp_path}/vanilla.yaml: teacher.* is unused with method: vanilla; remove it "
                               "(set: teacher.name)")
    cfg = load_config(write(tmp_path, "vanilla_ok.yaml", "method: vanilla\nstudent: {name: resnet56}\n"))
    assert cfg.method.name == "vanilla" and cfg.teacher.name is None


# -------------------------------------------------------------------------------------------------------- output_dir


def test_output_dir_defaults_to_runs_and_file_stem(tmp_path: Path) -> None:
    assert load_text(tmp_path, "", name="cifar100/ctkd_res56_res20.yaml").output_dir == "runs/ctkd_res56_res20"
    assert load_text(tmp_path, "output_dir: /scratch/run1\n").output_dir == "/scratch/run1"
    assert load_text(tmp_path, "", ("output_dir=/scratch/run2",)).output_dir == "/scratch/run2"


# --------------------------------------------------------------------------------------------- save / from_dict / diff


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """\
        data: {root: '1e-3', name: synthetic, test_batch_size: 16}
        student: {name: 'on'}
        optimizer: {lr: 1e-5, weight_decay: 5e-4, lr_decay_epochs: []}
        temperature: {name: instance, lr: 0.001, hidden_dim: 32}
        logging: {tensorboard: false}
    """)
    assert (cfg.data.root, cfg.student.name) == ("1e-3", "on")  # strings that other YAML readers mistake
    out = tmp_path / "runs" / "exp" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temp file left behind

    changed = dataclasses.replace(cfg, epochs=3)
    save_config(changed, out)  # overwrites in place
    assert load_config(out) == changed


def test_config_from_dict_is_strict(tmp_path: Path) -> None:
    data = config_to_dict(load_text(tmp_path, ""))
    data["optimizer"]["momentun"] = 0.9
    data["epochs"] = "240"
    snapshot = json.loads(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "checkpoint runs/exp/last.pth")
    message = str(info.value)
    assert ("checkpoint runs/exp/last.pth: unknown key 'optimizer.momentun'. "
            "Did you mean 'optimizer.momentum'?") in message
    assert "checkpoint runs/exp/last.pth: 'epochs' expects int, got str '240'" in message
    assert data == snapshot  # the input is not modified

    no_dir = config_to_dict(load_text(tmp_path, ""))
    no_dir["output_dir"] = None
    with pytest.raises(ConfigError, match=r"^stored: 'output_dir' must be set"):
        config_from_dict(no_dir, "stored")
    with pytest.raises(ConfigError, match=r"^stored: unknown key '_base_'"):
        config_from_dict({**config_to_dict(load_text(tmp_path, "")), "_base_": "x.yaml"}, "stored")


def test_diff_configs_lists_changed_keys(tmp_path: Path) -> None:
    a = load_text(tmp_path, "")
    b = load_text(tmp_path, "", ("optimizer.lr=0.1", "optimizer.lr_decay_epochs=[30,60]", "teacher.checkpoint=t.pth",
                                 "logging.tensorboard=false", "temperature.lr=0.01"))
    assert diff_configs(a, b) == [
        "teacher.checkpoint: 'ckpts/resnet56.pth' → 't.pth'",
        "temperature.lr: null → 0.01",
        "optimizer.lr: 0.05 → 0.1",
        "optimizer.lr_decay_epochs: [150, 180, 210] → [30, 60]",
        "logging.tensorboard: true → false",
    ]
    assert diff_configs(a, a) == []


def test_default_output_dir_mirrors_the_path_below_configs(tmp_path: Path) -> None:
    from ctkd.config import default_output_dir

    nested = tmp_path / "configs" / "cifar100" / "ctkd" / "resnet56_resnet20.yaml"
    assert default_output_dir(nested) == "runs/cifar100/ctkd/resnet56_resnet20"
    assert default_output_dir(tmp_path / "elsewhere" / "exp.yaml") == "runs/exp"


# ---------------------------------------------------------------------------------------------------------- methods
def test_method_section_is_validated_by_the_selected_method(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "method: {name: pkt, weight: 100}\n")
    assert (cfg.method.name, cfg.method.weight) == ("pkt", 100.0)
    assert load_text(tmp_path, "method: pkt\n").method.weight == 30000.0  # the shorthand takes the defaults
    assert "'method.weight' must be >= 0" in error_of(tmp_path, "method: {name: pkt, weight: -1}\n")
    assert "unknown key 'method.alpha'" in error_of(tmp_path, "method: {name: pkt, alpha: 1}\n")
    assert "unknown key 'method.weight'" in error_of(tmp_path, "method: {weight: 3}\n")  # kd has no weight


def test_switching_method_over_a_base_with_other_options_names_both(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", TEACHER + "method: {name: dkd, alpha: 1.0, beta: 8.0}\nloss: {kd_weight: 0.0}\n")
    message = error_of(tmp_path, "_base_: base.yaml\n", ("method.name=pkt",), name="child.yaml")
    assert "'method.name' is 'pkt', but method.alpha, method.beta (set by" in message and "base.yaml" in message
    assert "method=pkt" in message
    assert load_text(tmp_path, "_base_: base.yaml\nloss: {kd_weight: 0.9}\n", ("method=pkt",), "child.yaml").method \
        .name == "pkt"  # replacing the whole section works


def test_learned_temperature_must_reach_a_loss_term(tmp_path: Path) -> None:
    message = error_of(tmp_path, "method: pkt\nloss: {kd_weight: 0.0}\ntemperature: {name: global}\n")
    assert "'loss.kd_weight' is 0, so the learned temperature (global) reaches no loss term of method pkt" in message
    assert load_text(tmp_path, "method: dkd\nloss: {kd_weight: 0.0}\ntemperature: {name: global}\n")  # τ is DKD's
    assert load_text(tmp_path, "method: pkt\nloss: {kd_weight: 0.0}\ntemperature: {name: fixed}\n")


# ----------------------------------------------------------------------- every section as strict as method: and data:
def test_a_fixed_temperature_refuses_the_learned_ones_keys_and_any_curriculum(tmp_path: Path) -> None:
    """The sweep trap: `temperature.name=fixed temperature.hidden_dim=7 ...` must not load and run τ = 4 again."""
    message = error_of(tmp_path, "", ("temperature.name=fixed", "temperature.hidden_dim=7", "temperature.init_raw=3",
                                      "curriculum.loops=99"))
    assert "temperature.hidden_dim, temperature.init_raw" in message and "not options of fixed" in message
    message = error_of(tmp_path, "temperature: {name: fixed, hidden_dim: 7}\n")
    assert "unknown key 'temperature.hidden_dim'" in message and "options of temperature 'fixed'" in message
    message = error_of(tmp_path, "temperature: fixed\n", ("curriculum.loops=99",))
    assert message.startswith("command-line override 'curriculum.loops=99': curriculum.loops is set, but a fixed ")
    assert "nothing reads it" in message
    assert "curriculum.name" in error_of(tmp_path, "temperature: fixed\ncurriculum: linear\n")
    cfg = load_text(tmp_path, "temperature: {name: fixed, value: 2.0}\n")  # its own key, and the default curriculum
    assert (cfg.temperature.value, cfg.curriculum) == (2.0, Config().curriculum)


def test_each_temperature_and_curriculum_reads_only_its_own_keys(tmp_path: Path) -> None:
    assert "options of temperature 'global'" in error_of(tmp_path, "temperature: {hidden_dim: 64}\n")
    assert "options of temperature 'instance'" in error_of(tmp_path, "temperature: {name: instance, init_raw: 0}\n")
    assert "options of temperature 'global'" in error_of(tmp_path, "temperature: {value: 3}\n")
    assert "options of curriculum 'constant'" in error_of(tmp_path, "curriculum: {name: constant, loops: 5}\n")
    assert load_text(tmp_path, "curriculum: {name: constant, lambda_max: 0.5}\n").curriculum.lambda_max == 0.5
    assert load_text(tmp_path, "temperature: {name: instance, hidden_dim: 64}\n").temperature.hidden_dim == 64


def test_a_method_without_teacher_refuses_loss_temperature_and_curriculum_keys(tmp_path: Path) -> None:
    for text, key in (("loss: {kd_weight: 0.5}\n", "loss.kd_weight"), ("temperature: instance\n", "temperature.name"),
                      ("curriculum: {loops: 3}\n", "curriculum.loops")):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, "teacher.yaml", "method: vanilla\n" + text))
        assert f"{key} is set, but method vanilla" in str(info.value), text
    assert load_config(write(tmp_path, "plain.yaml", "method: vanilla\n")).method.name == "vanilla"


def test_a_checkpoints_config_of_the_flat_schema_is_upgraded_to_the_same_experiment(tmp_path: Path) -> None:
    """Configs saved before temperatures and curricula owned their keys held every key of every one of them."""
    from ctkd.config import upgrade_saved_config

    fixed = load_text(tmp_path, "temperature: {name: fixed, value: 2.0}\n")
    old = config_to_dict(fixed)
    old["temperature"] = {"name": "fixed", "value": 2.0, "t_start": 1.0, "t_range": 20.0, "adversarial": True,
                          "init_raw": 1.0, "hidden_dim": 256, "lr": None, "weight_decay": None}
    old["curriculum"] = {"name": "cosine", "lambda_min": 0.0, "lambda_max": 1.0, "loops": 2}  # never read
    with pytest.raises(ConfigError):
        config_from_dict(old, "stored")
    assert config_from_dict(upgrade_saved_config(old), "stored") == fixed
    learned = load_text(tmp_path, "curriculum: {name: constant, lambda_max: 0.5}\n")
    old = config_to_dict(learned)
    old["curriculum"] = {"name": "constant", "lambda_min": 0.0, "lambda_max": 0.5, "loops": 10}
    assert config_from_dict(upgrade_saved_config(old), "stored") == learned


def test_a_warm_up_as_long_as_the_run_is_refused_naming_both_keys(tmp_path: Path) -> None:
    message = error_of(tmp_path, "epochs: 5\noptimizer: {warmup_epochs: 5}\n")
    assert "'optimizer.warmup_epochs' (5) must be less than 'epochs' (5)" in message
    assert load_text(tmp_path, "epochs: 5\noptimizer: {warmup_epochs: 4.5}\n").optimizer.warmup_epochs == 4.5
