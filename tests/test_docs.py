"""docs/: the paper's numbers are consistent data that match the shipped configs, and the repository stands alone."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import ctkd.models as models
from conftest import REPO_ROOT
from ctkd.config import load_config

PAPER_RESULTS = REPO_ROOT / "docs" / "paper_results.yaml"
PLUGIN_METHODS = ("pkt", "sp", "vid", "crd", "srrl", "dkd")
IMAGENET_ROWS = ("teacher", "student") + tuple(
    f"{m}{s}" for m in ("kd", "pkt", "rkd", "srrl", "dkd") for s in ("", "_ctkd")
)
TOLERANCE = 0.011  # printed numbers have two decimals: a difference of two of them is exact to ±0.01

# Files of the private specification that a user's clone never has; built from pieces so this file does not match.
FORBIDDEN = ("../" + "shared", "PAPER" + ".md", "REFERENCE" + ".md", "RELIABILITY" + ".md", "STYLE" + ".md",
             "CTKD_" + "REFERENCE_DIR")  # fmt: skip
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}  # anywhere, and at the root (outputs):
SKIPPED_ROOT_DIRS = {"runs", "data", "build", "plots", "checkpoints"}


@cache
def paper() -> dict[str, Any]:
    """docs/paper_results.yaml, parsed."""
    return yaml.safe_load(PAPER_RESULTS.read_text(encoding="utf-8"))


def _typos() -> set[tuple[str, str, str, str | None]]:
    """(table, row, column, field) of every cell listed under known_typos."""
    return {(t["table"], t["row"], t["column"], t["field"]) for t in paper()["known_typos"]}


# ---------------------------------------------------------------------------------------------- paper_results.yaml
def test_paper_results_has_the_documented_tables() -> None:
    assert set(paper()) == {
        "teachers", "students", "cifar_kd", "cifar_plugin", "imagenet", "temperature_grid", "known_typos",
        "repdistiller_same_arch", "repdistiller_cross_arch", "mdistiller_dkd",
    }  # fmt: skip
    assert len(paper()["cifar_kd"]) == 11
    assert len(paper()["cifar_plugin"]) == 7
    assert tuple(paper()["imagenet"]) == IMAGENET_ROWS
    assert len(paper()["temperature_grid"]) == 4


def test_cifar_kd_rows_name_registered_models_and_consistent_numbers() -> None:
    registered = set(models.list_models())
    teachers, students = paper()["teachers"], paper()["students"]
    for row, r in paper()["cifar_kd"].items():
        assert row == f"{r['teacher']}_{r['student']}"
        assert {r["teacher"], r["student"]} <= registered, row
        assert r["teacher_acc"] == teachers[r["teacher"]]["top1"], row
        assert r["student_acc"] == students[r["student"]]["top1"], row
        assert r["delta"] == pytest.approx(r["ctkd"] - r["kd"], abs=TOLERANCE), row
        assert r["architecture"] == ("same" if r["student"] in {"resnet20", "resnet32", "wrn_16_2", "wrn_40_1", "vgg8"}
                                     else "cross"), row  # fmt: skip


REPDISTILLER_METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd")


def test_benchmark_tables_name_registered_models_and_agree_with_the_ctkd_paper() -> None:
    """RepDistiller's and mdistiller's rows: our model names, every method column, and the KD numbers the CTKD paper
    and mdistiller copied from RepDistiller equal RepDistiller's."""
    registered = set(models.list_models())
    repdistiller = {**paper()["repdistiller_same_arch"], **paper()["repdistiller_cross_arch"]}
    assert (len(paper()["repdistiller_same_arch"]), len(paper()["repdistiller_cross_arch"])) == (7, 6)
    for table in ("repdistiller_same_arch", "repdistiller_cross_arch", "mdistiller_dkd"):
        for row, r in paper()[table].items():
            assert row == f"{r['teacher']}_{r['student']}" and {r["teacher"], r["student"]} <= registered, row
    for row, r in repdistiller.items():
        expected = set(REPDISTILLER_METHODS) - ({"fsp"} if row in paper()["repdistiller_cross_arch"] else set())
        assert set(r) == {"teacher", "student", "teacher_acc", "student_acc"} | expected, row
        assert r["teacher_acc"] == paper()["teachers"][r["teacher"]]["top1"], row
        if row in paper()["cifar_kd"] and row != "resnet110_resnet20":  # the CTKD paper prints 70.66, CRD 70.67
            assert r["kd"] == paper()["cifar_kd"][row]["kd"], row
    assert (repdistiller["resnet110_resnet20"]["kd"], paper()["cifar_kd"]["resnet110_resnet20"]["kd"]) == (70.67, 70.66)
    assert len(paper()["mdistiller_dkd"]) == 11
    for row, r in paper()["mdistiller_dkd"].items():
        assert r["kd"] == repdistiller[row]["kd"] and r["dkd"] > r["kd"], row


def test_cifar_teachers_and_students_are_registered_models() -> None:
    registered = set(models.list_models())
    for table in ("teachers", "students"):
        for name, r in paper()[table].items():
            assert r["dataset"] in {"cifar100", "imagenet"}
            if r["dataset"] == "cifar100":
                assert name in registered, name
            else:
                assert set(r) == {"dataset", "top1", "top5"}, name


def test_cifar_plugin_cells_and_deltas_are_consistent_except_the_documented_typos() -> None:
    found = set()
    for row, r in paper()["cifar_plugin"].items():
        kd_row = paper()["cifar_kd"][row]
        assert (r["teacher"], r["student"]) == (kd_row["teacher"], kd_row["student"]), row
        for column, table in (("teacher_acc", "teachers"), ("student_acc", "students")):
            if r[column] != paper()[table][r[column.split("_")[0]]]["top1"]:
                found.add(("cifar_plugin", row, column, None))
        for method in PLUGIN_METHODS:
            base, ctkd = r[method], r[f"{method}_ctkd"]
            assert set(base) == {"mean", "std"} and set(ctkd) == {"mean", "std", "delta"}, (row, method)
            assert all(isinstance(v, float) and 0 <= v <= 100 for v in (*base.values(), ctkd["mean"], ctkd["std"]))
            if abs(ctkd["delta"] - (ctkd["mean"] - base["mean"])) > TOLERANCE:
                found.add(("cifar_plugin", row, f"{method}_ctkd", "delta"))
    assert found == _typos()


def test_known_typos_name_the_stored_value_and_the_consistent_one() -> None:
    assert len(paper()["known_typos"]) == 3  # SN-V1 70.70 vs 70.50, and two printed Δs
    for typo in paper()["known_typos"]:
        cell = paper()[typo["table"]][typo["row"]][typo["column"]]
        stored = cell if typo["field"] is None else cell[typo["field"]]
        assert stored == typo["printed"]
        if typo["field"] == "delta":
            base = paper()[typo["table"]][typo["row"]][typo["column"].removesuffix("_ctkd")]
            assert typo["expected"] == pytest.approx(cell["mean"] - base["mean"], abs=TOLERANCE)
        else:
            assert typo["expected"] == paper()["students"][paper()[typo["table"]][typo["row"]]["student"]]["top1"]


def test_imagenet_table() -> None:
    rows = paper()["imagenet"]
    assert all(set(r) == {"top1", "top5"} and r["top1"] < r["top5"] for r in rows.values())
    assert rows["teacher"] == {k: paper()["teachers"]["ResNet34"][k] for k in ("top1", "top5")}
    assert rows["student"] == {k: paper()["students"]["ResNet18"][k] for k in ("top1", "top5")}


def test_temperature_grid_agrees_with_the_cifar_table() -> None:
    for row, r in paper()["temperature_grid"].items():
        assert row == f"{r['teacher']}_{r['student']}" and row in paper()["cifar_kd"]
        assert r["ctkd"] == paper()["cifar_kd"][row]["ctkd"], row
        assert r["ctkd_final_tau"] in r["fixed"], row  # one fixed run uses the τ CTKD ends at
        assert 4 in r["fixed"] and all(isinstance(t, (int, float)) and t > 0 for t in r["fixed"]), row


@pytest.mark.parametrize("kind", ["kd", "ctkd"])
def test_cifar_pairs_have_configs_naming_their_models(kind: str) -> None:
    for row, r in paper()["cifar_kd"].items():
        path = REPO_ROOT / "configs" / "cifar100" / kind / f"{row}.yaml"
        assert path.is_file(), f"{path} is missing for the paper's pair {row}"
        cfg = load_config(path)
        assert (cfg.teacher.name, cfg.student.name) == (r["teacher"], r["student"]), path
        assert cfg.temperature.name == ("fixed" if kind == "kd" else "global"), path
    for teacher in {r["teacher"] for r in paper()["cifar_kd"].values()}:
        assert (REPO_ROOT / "configs" / "cifar100" / "teachers" / f"{teacher}.yaml").is_file(), teacher


# ---------------------------------------------------------------------------------------------- stands alone
@cache
def repo_files() -> tuple[Path, ...]:
    """Files a commit of the working tree would hold: tracked or untracked-but-not-ignored (a tree walk without git)."""
    if (REPO_ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT, capture_output=True, check=True,
        ).stdout.decode()
        names = [name for name in out.split("\0") if name]
    else:
        names = []
        for folder, dirs, files in os.walk(REPO_ROOT):
            skipped = SKIPPED_DIRS | (SKIPPED_ROOT_DIRS if Path(folder) == REPO_ROOT else set())
            dirs[:] = [d for d in dirs if d not in skipped and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(folder, f), REPO_ROOT) for f in files]
    return tuple(sorted(REPO_ROOT / name for name in names if (REPO_ROOT / name).is_file()))


def _text_files(*suffixes: str) -> list[Path]:
    """The repository's files with one of `suffixes`."""
    return [p for p in repo_files() if p.suffix in suffixes]


def _rel(path: Path) -> str:
    """`path` relative to the repository root, for messages."""
    return path.relative_to(REPO_ROOT).as_posix()


def test_no_file_refers_to_the_private_specification() -> None:
    offenders = []
    for path in repo_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            offenders += [f"{_rel(path)}:{lineno}: {needle}" for needle in FORBIDDEN if needle in line]
    assert not offenders, "files a user's clone does not have are referred to:\n" + "\n".join(offenders)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> list[str]:
    """The text of every heading of a Markdown file, outside code blocks."""
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", _without_code(path.read_text("utf-8")), re.M)]


def _without_code(text: str) -> str:
    """Markdown text with fenced code blocks and inline code removed."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def test_markdown_links_point_to_existing_files_and_headings() -> None:
    broken = []
    for path in _text_files(".md"):
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _without_code(path.read_text("utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{_rel(path)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in {_slug(h) for h in _headings(dest)}:
                broken.append(f"{_rel(path)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_paths_named_in_code_configs_and_markdown_exist() -> None:
    missing = []
    for path in _text_files(".py", ".yaml", ".yml", ".md", ".sh", ".sbatch", ".toml"):
        for match in re.finditer(r"(?<![\w/.-])docs/[\w./-]+", path.read_text("utf-8")):
            name = match.group(0).rstrip(".-/")
            if not (REPO_ROOT / name).is_file():
                missing.append(f"{_rel(path)}: {name}")
    assert not missing, "docs/ paths that do not exist:\n" + "\n".join(missing)


def test_section_citations_name_existing_headings_and_tables() -> None:
    """'docs/method.md, Curriculum' must name a heading of method.md; 'docs/paper_results.yaml: cifar_kd' a table."""
    wrong = []
    for path in _text_files(".py", ".yaml", ".yml", ".md", ".sh", ".sbatch"):
        text = path.read_text("utf-8")
        for match in re.finditer(r"(?<![\w/.-])docs/([\w.-]+\.md), ([^\n]+)", text):
            cited = re.split(r"[).;:,'\"`]", match.group(2), maxsplit=1)[0].strip()
            doc = REPO_ROOT / "docs" / match.group(1)
            if not cited or cited[0] in "abcdefghijklmnopqrstuvwxyz" or not doc.is_file():
                continue  # a sentence that goes on ("docs/method.md, which ..."), or a missing file (tested above)
            if not any(h.lower().startswith(cited.lower()) for h in _headings(doc)):
                wrong.append(f"{_rel(path)}: {match.group(0)[:80]}")
        for match in re.finditer(re.escape(_rel(PAPER_RESULTS)) + r": `?(\w+)`?(?:, (\w+))?", text):
            table, row = match.groups()
            if table not in paper() or (row is not None and row not in paper()[table]):
                wrong.append(f"{_rel(path)}: {match.group(0)}")
    assert not wrong, "citations of sections or tables that do not exist:\n" + "\n".join(wrong)


def _first_code_block(heading: str) -> list[str]:
    """The lines of the first fenced code block below README heading `## {heading}`."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1]
    return [line for line in section.split("```", 2)[1].splitlines() if line.strip()]


def test_ci_installs_and_tests_with_the_readme_commands_in_a_fresh_environment() -> None:
    """CI must see what a new user gets: README's install and test commands, in a virtual environment it makes."""
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    install, test = _first_code_block("Set up"), _first_code_block("Tests")
    assert install == ["pip install -r requirements.txt"] and test == ["python -m pytest -q"]
    assert any(line.startswith("python3 -m venv ") for line in ci) and 'source "$venv/bin/activate"' in ci
    venv_at = next(i for i, line in enumerate(ci) if line.startswith("python3 -m venv "))
    assert ci.index(f"{install[0].replace('pip install', 'pip install -q', 1)}") > venv_at
    assert ci[-1] == test[0]


def test_pytest_approx_refuses_tensors_on_every_pytest_version() -> None:
    """pytest 9.2 cannot take a 0-d tensor as the expected value; the suite refuses tensors whatever pytest it runs."""
    import torch

    with pytest.raises(TypeError, match="tensor"):
        pytest.approx(torch.tensor(1.0))
    with pytest.raises(TypeError, match="tensor"):
        pytest.approx([1.0, torch.tensor(2.0)])
    assert 1.0 == pytest.approx(torch.tensor(1.0).item())


# ------------------------------------------------------------------------------------------ README, Components
def _components_table() -> dict[str, str]:
    """kind → the 'registered names' cell of README's Components table."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Components\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[3] for cells in rows[1:]}


_REGISTERED = """
import json
from ctkd.curricula import CURRICULA
from ctkd.datasets import DATASETS
from ctkd.methods import METHODS
from ctkd.models import MODELS
from ctkd.temperatures import TEMPERATURES
registries = {"model": MODELS, "dataset": DATASETS, "method": METHODS, "temperature": TEMPERATURES,
              "curriculum": CURRICULA}
print(json.dumps({kind: registry.explicit_names() for kind, registry in registries.items()}))
"""


def test_readme_lists_every_registered_component_and_only_those() -> None:
    """A fresh interpreter sees what a user sees: no test-only model registered by another test module."""
    done = subprocess.run([sys.executable, "-c", _REGISTERED], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True)
    registered = json.loads(done.stdout)
    table = _components_table()
    assert set(table) == set(registered)
    for kind, names in registered.items():
        listed = set(re.findall(r"`([A-Za-z0-9_]+)`", table[kind]))
        assert listed == set(names), kind


def test_readme_component_example_registers_a_working_curriculum() -> None:
    """The walked-through file, run as written, adds a curriculum that a config can select."""
    from ctkd.curricula import CURRICULA
    from ctkd.curricula import base as curricula_base

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    code = text.split("\n## Components\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("from .base import", "from ctkd.curricula.base import")
    module = types.ModuleType("readme_step")  # dataclasses resolve annotations through sys.modules
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "README.md (Components)", "exec"), module.__dict__)
        step = curricula_base.build_curriculum(curricula_base.curriculum_options("step", hold=2, lambda_max=0.5))
        assert [step(e) for e in (1, 2, 3, 10)] == [0.0, 0.0, 0.5, 0.5]
        with pytest.raises(ValueError, match="hold"):
            curricula_base.curriculum_options("step", hold=-1)
    finally:
        CURRICULA._builders.pop("step", None)
        del sys.modules[module.__name__]


def test_readme_add_your_own_method_example_trains_its_head() -> None:
    """The walked-through method file, run as written: registered, configurable, its projection trained by a step."""
    from ctkd.datasets.loader import Batch
    from ctkd.distiller import build_distiller, measure_setup
    from ctkd.methods import METHODS, StepContext
    from ctkd.options import LossConfig
    from ctkd.temperatures import FixedTemperature

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    code = text.split("\n### Add your own method\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("readme_pooled_mse")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "README.md (Add your own method)", "exec"), module.__dict__)
        method = METHODS.get("pooled_mse")
        torch.manual_seed(0)
        student, teacher = models.build_model("resnet8", num_classes=10), models.build_model("resnet14", num_classes=10)
        setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=10,
                              train_targets=torch.zeros(0, dtype=torch.long), seed=0, features=method.features)
        distiller = build_distiller(method.Options(weight=2.0), student=student, teacher=teacher,
                                    temperature=FixedTemperature(4.0), loss=LossConfig(), setup=setup)
        batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.arange(4), 4)
        out = distiller(batch, StepContext(epoch=1, step=0, grl_lambda=1.0))
        out.losses["loss_pooled_mse"].backward()
        assert distiller.unwrapped.projection.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in teacher.parameters())
        with pytest.raises(ValueError, match="weight"):
            method.Options(weight=-1.0)
    finally:
        METHODS._builders.pop("pooled_mse", None)
        del sys.modules[module.__name__]
