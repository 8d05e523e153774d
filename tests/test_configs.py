"""Every shipped config loads, names registered models, and encodes the paper's experiment it claims."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ctkd.models as models
from conftest import REPO_ROOT, load_script
from ctkd.config import load_config

CONFIGS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if not {"_base_", "tables"} & set(p.parts))
# The benchmark tables' 346 configs repeat each (method, variant) over 13 pairs: a step is taken on one pair of one
# family and one cross-family pair (MobileNetV2 student) of each, plus every other config; all of them load.
BENCHMARK_STEP_PAIRS = ("resnet56_resnet20", "vgg13_MobileNetV2")
STEP_CONFIGS = [p for p in CONFIGS
                if p.stem in BENCHMARK_STEP_PAIRS or not {"repdistiller", "dkd_recipe"} & set(p.parts)]
# The 11 (teacher, student) pairs of the paper's CIFAR-100 table (docs/paper_results.yaml: cifar_kd).
PAIRS = [
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet110", "resnet20"), ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
]  # fmt: skip
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_config_loads_and_builds_its_models(path: Path) -> None:
    cfg = load_config(path)
    num_classes = 100 if cfg.data.name == "cifar100" else cfg.data.num_classes
    names = [cfg.student.name] + ([cfg.teacher.name] if cfg.method.name != "vanilla" else [])
    for name in names:
        with torch.device("meta"):  # builds the full architecture without allocating its weights
            model = models.build_model(name, num_classes=num_classes)
        assert model.get_classifier().out_features == num_classes


@pytest.mark.parametrize("kind", ["kd", "ctkd"])
def test_cifar_pair_configs_follow_the_paper(kind: str) -> None:
    found = sorted(p.stem for p in (REPO_ROOT / "configs/cifar100" / kind).glob("*.yaml"))
    assert found == sorted(f"{t}_{s}" for t, s in PAIRS)
    for teacher, student in PAIRS:
        cfg = load_config(REPO_ROOT / "configs/cifar100" / kind / f"{teacher}_{student}.yaml")
        assert (cfg.teacher.name, cfg.student.name, cfg.method.name) == (teacher, student, "kd")
        assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (0.1, 0.9)
        assert (cfg.epochs, cfg.data.batch_size, cfg.data.effective_test_batch_size) == (240, 64, 32)
        assert cfg.optimizer.lr == (0.01 if student in LOW_LR_STUDENTS else 0.05)
        assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.9, 5e-4)
        assert cfg.optimizer.lr_decay_epochs == (150, 180, 210) and cfg.optimizer.lr_decay_rate == 0.1
        assert cfg.teacher.checkpoint.endswith(f"{teacher}_vanilla/ckpt_epoch_240.pth")
        assert cfg.output_dir == f"runs/cifar100/{kind}/{teacher}_{student}"
        if kind == "kd":
            assert (cfg.temperature.name, cfg.temperature.value) == ("fixed", 4.0)
        else:
            t, c = cfg.temperature, cfg.curriculum
            assert (t.name, t.t_start, t.t_range, t.init_raw) == ("global", 1.0, 20.0, 1.0)
            assert (c.name, c.lambda_min, c.lambda_max, c.loops) == ("cosine", 0.0, 1.0, 10)


def test_teacher_configs_cover_every_teacher_of_the_paper() -> None:
    teachers = {t for t, _ in PAIRS}
    found = {p.stem for p in (REPO_ROOT / "configs/cifar100/teachers").glob("*.yaml")}
    assert found == teachers
    for name in teachers:
        cfg = load_config(REPO_ROOT / "configs/cifar100/teachers" / f"{name}.yaml")
        assert (cfg.method.name, cfg.student.name, cfg.optimizer.lr, cfg.epochs) == ("vanilla", name, 0.05, 240)


def test_readme_config_reference_lists_every_key_with_its_default() -> None:
    """The README's config table documents exactly the schema's keys, with the schema's defaults."""
    import re

    from ctkd.config import Config, config_to_dict
    from ctkd.curricula import CURRICULA
    from ctkd.keys import flatten_keys
    from ctkd.temperatures import TEMPERATURES
    from ctkd.yamlio import parse_yaml

    defaults = flatten_keys(config_to_dict(Config()))
    for section, registry in (("temperature", TEMPERATURES), ("curriculum", CURRICULA)):  # every one's own keys
        for name in registry.names():
            options = flatten_keys({section: config_to_dict(registry.get(name).Options())})
            defaults.update({key: value for key, value in options.items() if key != f"{section}.name"})
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", (REPO_ROOT / "README.md").read_text(), re.MULTILINE)
    documented = dict(rows)
    assert documented.keys() == defaults.keys()
    for key, value in defaults.items():
        if key != "output_dir":  # its default is derived from the config's path
            shown = parse_yaml(documented[key], "README")  # as a config file reads it (YAML 1.2: `off` is a string)
            assert shown == value or (isinstance(value, list) and shown == list(value)), key


# ------------------------------------------------------------------------------------------------ generated configs
def _make_configs():
    """scripts/make_configs.py as a module."""
    return load_script("make_configs")


def test_generated_configs_are_up_to_date_with_their_tables() -> None:
    make = _make_configs()
    wanted = make.all_configs()
    assert make.problems(wanted) == []  # else: python scripts/make_configs.py
    some = sorted(wanted)[0]
    assert make.problems({**wanted, some: wanted[some] + "# edited\n"}) == [f"stale: {some.relative_to(REPO_ROOT)}"]


PLUGIN = {  # method → (γ, α, method options): the authors' CIFAR scripts (docs/settings.md)
    "pkt": (0.1, 0.9, {"weight": 30000.0}),
    "sp": (0.1, 0.9, {"weight": 3000.0}),
    "vid": (0.1, 0.9, {"weight": 1.0}),
    "crd": (0.1, 0.9, {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5}),
    "srrl": (0.1, 0.9, {"weight": 1.0}),
    "dkd": (1.0, 0.0, {"weight": 1.0, "alpha": 1.0, "beta": 2.0, "warmup_epochs": 0}),
    "rkd": (0.1, 0.9, {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}),
}
PLUGIN_PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet110", "resnet20"),
                ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet32x4", "ShuffleV1"),
                ("resnet32x4", "ShuffleV2")]  # the 7 pairs of the paper's plug-in table


@pytest.mark.parametrize("method", sorted(PLUGIN))
def test_plugin_configs_follow_the_paper(method: str) -> None:
    gamma, alpha, options = PLUGIN[method]
    for variant in ("base", "ctkd"):
        folder = REPO_ROOT / "configs/cifar100/plugin" / method / variant
        assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(f"{t}_{s}" for t, s in PLUGIN_PAIRS)
        for teacher, student in PLUGIN_PAIRS:
            cfg = load_config(folder / f"{teacher}_{student}.yaml")
            assert (cfg.teacher.name, cfg.student.name, cfg.method.name) == (teacher, student, method)
            assert {key: getattr(cfg.method, key) for key in options} == options
            assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (gamma, alpha)
            assert cfg.optimizer.lr == (0.01 if student in LOW_LR_STUDENTS else 0.05) and cfg.epochs == 240
            if variant == "base":
                assert (cfg.temperature.name, cfg.temperature.value) == ("fixed", 4.0)
            else:
                assert (cfg.temperature.name, cfg.curriculum.name, cfg.curriculum.loops) == ("global", "cosine", 10)
            assert cfg.output_dir == f"runs/cifar100/plugin/{method}/{variant}/{teacher}_{student}"


def test_temperature_grid_and_ablation_configs() -> None:
    grid = {p.stem: load_config(p) for p in (REPO_ROOT / "configs/cifar100/temperature_grid").glob("*.yaml")}
    assert {name: (cfg.temperature.name, cfg.temperature.value) for name, cfg in grid.items()} == {
        "resnet110_resnet20_T2": ("fixed", 2.0), "resnet110_resnet20_T3": ("fixed", 3.0),
        "resnet110_resnet20_T5": ("fixed", 5.0), "wrn_40_2_wrn_40_1_T2": ("fixed", 2.0),
        "wrn_40_2_wrn_40_1_T3": ("fixed", 3.0), "wrn_40_2_wrn_40_1_T3.6": ("fixed", 3.6),
        "vgg13_vgg8_T2": ("fixed", 2.0), "vgg13_vgg8_T3": ("fixed", 3.0), "vgg13_vgg8_T3.5": ("fixed", 3.5),
        "resnet32x4_ShuffleV1_T2": ("fixed", 2.0), "resnet32x4_ShuffleV1_T3": ("fixed", 3.0),
        "resnet32x4_ShuffleV1_T3.4": ("fixed", 3.4),
    }  # τ = 4 is configs/cifar100/kd/<pair>.yaml
    ablations = REPO_ROOT / "configs/cifar100/ablations"
    for pair in ("resnet56_resnet20", "vgg13_vgg8"):
        constant = load_config(ablations / "constant_lambda" / f"{pair}.yaml")
        linear = load_config(ablations / "linear_lambda" / f"{pair}.yaml")
        instance = load_config(ablations / "instance_tau" / f"{pair}.yaml")
        plain = load_config(ablations / "no_reversal" / f"{pair}.yaml")
        assert (constant.curriculum.name, linear.curriculum.name) == ("constant", "linear")
        assert instance.temperature.name == "instance" and plain.temperature.adversarial is False
        for cfg in (constant, linear, instance, plain):
            assert cfg.method.name == "kd" and (cfg.loss.ce_weight, cfg.loss.kd_weight) == (0.1, 0.9)


@pytest.mark.slow
@pytest.mark.parametrize("path", STEP_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_config_takes_a_training_step(path: Path) -> None:
    """One optimizer step of the config's method, models, temperature and heads, on random CIFAR-shaped data
    (the teacher with random weights: the step, not the teacher file, is under test)."""
    from ctkd.datasets.loader import Batch
    from ctkd.distiller import build_distiller, measure_setup
    from ctkd.methods import METHODS, StepContext
    from ctkd.optim import build_sgd
    from ctkd.temperatures import build_temperature

    cfg = load_config(path)
    classes = 100 if cfg.data.name == "cifar100" else cfg.data.num_classes
    gen = torch.Generator().manual_seed(0)
    train_targets = torch.randint(0, classes, (64,), generator=gen)
    torch.manual_seed(0)
    student = models.build_model(cfg.student.name, num_classes=classes)
    method = METHODS.get(cfg.method.name)
    teacher = models.build_model(cfg.teacher.name, num_classes=classes) if method.uses_teacher else None
    temperature = build_temperature(cfg.temperature, num_classes=classes) if method.uses_teacher else None
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=classes,
                          train_targets=train_targets, seed=0, features=method.features, preact=method.preact)
    distiller = build_distiller(cfg.method, student=student, teacher=teacher, temperature=temperature,
                                loss=cfg.loss, setup=setup)
    optimizer = build_sgd(distiller.unwrapped, lr=cfg.optimizer.lr, momentum=0.9, weight_decay=5e-4)
    indices = torch.tensor([3, 17, 42, 60])
    batch = Batch(torch.randn(4, 3, 32, 32, generator=gen), train_targets[indices], indices, 4)
    before = {k: v.clone() for k, v in distiller.unwrapped.state_dict().items()}
    out = distiller.train()(batch, StepContext(epoch=1, step=0, grl_lambda=0.5))
    loss = sum(out.losses.values())
    assert torch.isfinite(loss) and out.logits.shape == (4, classes)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = [k for k, v in distiller.unwrapped.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("student.") for k in changed)
    if method.uses_teacher:
        assert set(out.losses) >= {"loss_ce"} and "tau" in out.stats


IMAGENET_METHODS = {  # column → (method, γ, α, method options): the authors' ImageNet script (docs/settings.md)
    "kd": ("kd", 1.0, 1.0, {}),
    "pkt": ("pkt", 1.0, 1.0, {"weight": 30000.0}),
    "rkd": ("rkd", 1.0, 1.0, {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}),
    "srrl": ("srrl", 1.0, 1.0, {"weight": 1.0}),
    "dkd": ("dkd", 1.0, 0.0, {"weight": 1.0, "alpha": 1.0, "beta": 1.0, "warmup_epochs": 0}),
}


def test_imagenet_table_configs_follow_the_paper() -> None:
    """Every cell of the ImageNet table: ResNet-34 → ResNet-18, 120 epochs, batch 256, LR 0.1 ×0.1 at 30/60/90,
    wd 1e-4, the method's weights, τ = 4 or CTKD with E_loops 5; the teacher and baseline configs: 100 epochs."""
    from ctkd.tables import load_table

    table = load_table(REPO_ROOT / "configs/tables/imagenet.yaml")
    cells = {column: cell for (_, column), cell in table.cells.items()}
    assert set(cells) == {f"{c}{s}" for c in IMAGENET_METHODS for s in ("", "_ctkd")}
    for column, cell in cells.items():
        method, gamma, alpha, options = IMAGENET_METHODS[column.removesuffix("_ctkd")]
        cfg = load_config(REPO_ROOT / cell.config)
        assert (cfg.teacher.name, cfg.student.name, cfg.method.name) == ("ResNet34", "ResNet18", method)
        assert (cfg.data.name, cfg.data.batch_size, cfg.data.num_classes, cfg.epochs) == ("imagenet", 256, 1000, 120)
        optimizer = cfg.optimizer
        assert (optimizer.lr, optimizer.weight_decay, optimizer.lr_decay_epochs) == (0.1, 1e-4, (30, 60, 90))
        assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (gamma, alpha)
        assert {key: getattr(cfg.method, key) for key in options} == options
        if column.endswith("_ctkd"):
            assert (cfg.temperature.name, cfg.curriculum.name, cfg.curriculum.loops) == ("global", "cosine", 5)
        else:
            assert (cfg.temperature.name, cfg.temperature.value) == ("fixed", 4.0)
        assert cell.paper_path == ("imagenet", column)
    for path, name in (("teachers/ResNet34.yaml", "ResNet34"), ("vanilla/ResNet18.yaml", "ResNet18")):
        cfg = load_config(REPO_ROOT / "configs/imagenet" / path)
        assert (cfg.method.name, cfg.student.name, cfg.epochs, cfg.optimizer.lr) == ("vanilla", name, 100, 0.1)
    assert table.teachers == {"ResNet34": "configs/imagenet/teachers/ResNet34.yaml"}


# ------------------------------------------------------------------------------ RepDistiller's and mdistiller's tables
# RepDistiller's scripts/run_cifar_distill.sh: KD -r 0.1 -a 0.9; every other method -r 1 -a 0 -b β. AB and FSP act only
# in their init stage (its train_distill zeroes their term); CC runs its own formula.
REPDISTILLER_BETA = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "cc": 0.02, "vid": 1.0, "rkd": 1.0, "pkt": 30000.0,
                     "ab": 0.0, "ft": 200.0, "fsp": 0.0, "nst": 50.0, "crd": 0.8}
# mdistiller's configs/cifar100/dkd/*.yaml: β per pair (engine/cfg.py's default 8 where a file sets none)
MDISTILLER_DKD_BETA = {"resnet56_resnet20": 2.0, "resnet110_resnet32": 2.0, "resnet32x4_resnet8x4": 8.0,
                       "wrn_40_2_wrn_16_2": 6.0, "wrn_40_2_wrn_40_1": 6.0, "vgg13_vgg8": 6.0,
                       "resnet32x4_ShuffleV1": 8.0, "wrn_40_2_ShuffleV1": 8.0, "vgg13_MobileNetV2": 6.0,
                       "ResNet50_MobileNetV2": 8.0, "resnet32x4_ShuffleV2": 8.0}


def _check_temperature(cfg, variant: str) -> None:
    if variant == "base":
        assert (cfg.temperature.name, cfg.temperature.value) == ("fixed", 4.0)
    else:
        assert (cfg.temperature.name, cfg.curriculum.name, cfg.curriculum.loops) == ("global", "cosine", 10)


@pytest.mark.parametrize("method", ["kd", *sorted(REPDISTILLER_BETA)])
def test_repdistiller_configs_use_its_weights_and_ctkd_adds_the_papers_kd_term(method: str) -> None:
    from ctkd.tables import load_table

    tables = [load_table(REPO_ROOT / f"configs/tables/repdistiller_{kind}_arch.yaml") for kind in ("same", "cross")]
    cells = [(table, cell) for table in tables for cell in table.ordered_cells() if cell.column.startswith(method + "_")
             or cell.column == method]
    expected_pairs = 12 if method == "fsp" else 26  # 13 pairs; FSP: 6 of the same-family table (one has no number)
    assert len(cells) == expected_pairs
    for _, cell in cells:
        variant = "ctkd" if cell.column.endswith("_ctkd") else "base"
        cfg = load_config(REPO_ROOT / cell.config)
        assert f"{cfg.teacher.name}_{cfg.student.name}" == cell.row and cfg.method.name == method
        assert cfg.optimizer.lr == (0.01 if cfg.student.name in LOW_LR_STUDENTS else 0.05) and cfg.epochs == 240
        _check_temperature(cfg, variant)
        if method == "kd":
            assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (0.1, 0.9)
            continue
        assert cfg.method.weight == REPDISTILLER_BETA[method]
        assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == ((1.0, 0.0) if variant == "base" else (0.1, 0.9))
        if method in {"ab", "fsp"}:
            assert cfg.method.init_epochs == 30
            assert cfg.method.init_lr == (0.01 if cfg.student.name in LOW_LR_STUDENTS else 0.05)
        if method == "ft":  # helper/pretrain.py: 0.01 for resnet and wrn students, else the run's LR
            resnet_or_wrn = cfg.student.name.startswith(("resnet", "wrn"))
            assert cfg.method.init_lr == (0.01 if resnet_or_wrn or cfg.student.name in LOW_LR_STUDENTS else 0.05)
        if method == "cc":
            assert cfg.method.kernel == "repdistiller"


def test_repdistiller_tables_put_the_published_numbers_beside_the_base_cells() -> None:
    from ctkd.table_cells import cell_paper, load_paper_results
    from ctkd.tables import load_table

    paper = load_paper_results(REPO_ROOT / "docs" / "paper_results.yaml")
    same = load_table(REPO_ROOT / "configs/tables/repdistiller_same_arch.yaml")
    assert cell_paper(same, same.cells[("resnet56_resnet20", "crd")], paper).mean == 71.16
    assert cell_paper(same, same.cells[("resnet56_resnet20", "crd_ctkd")], paper).mean is None
    assert ("wrn_40_2_wrn_40_1", "fsp") not in same.cells  # no published number, no run
    cross = load_table(REPO_ROOT / "configs/tables/repdistiller_cross_arch.yaml")
    assert len(cross.rows) == 6 and not any(column.startswith("fsp") for column in cross.columns)
    assert cell_paper(cross, cross.cells[("vgg13_MobileNetV2", "at")], paper).mean == 59.4


def test_dkd_recipe_configs_follow_mdistiller() -> None:
    from ctkd.tables import load_table

    table = load_table(REPO_ROOT / "configs/tables/dkd_recipe.yaml")
    assert sorted(table.rows) == sorted(MDISTILLER_DKD_BETA)
    for pair, beta in MDISTILLER_DKD_BETA.items():
        kd = load_config(REPO_ROOT / table.cells[(pair, "kd")].config)
        assert kd.method.name == "kd" and (kd.loss.ce_weight, kd.loss.kd_weight) == (0.1, 0.9)
        for column, variant in (("dkd", "base"), ("dkd_ctkd", "ctkd")):
            cfg = load_config(REPO_ROOT / table.cells[(pair, column)].config)
            assert f"{cfg.teacher.name}_{cfg.student.name}" == pair and cfg.method.name == "dkd"
            assert (cfg.method.alpha, cfg.method.beta, cfg.method.warmup_epochs) == (1.0, beta, 20)
            assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (1.0, 0.0)
            assert cfg.optimizer.lr == (0.01 if cfg.student.name in LOW_LR_STUDENTS else 0.05)
            _check_temperature(cfg, variant)
