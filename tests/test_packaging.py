"""The repository installs as a package and coexists with the libraries it is used with."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

from conftest import REPO_ROOT


def _pyproject() -> dict:
    """pyproject.toml, parsed."""
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _requirement_name(line: str) -> str:
    """The distribution name of a requirement line ('torch>=2.1,<2.15' → 'torch')."""
    return re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower()


def _requirements_section(title: str) -> list[str]:
    """The requirements of requirements.txt under the comment `# {title}` (up to the next comment line)."""
    lines, inside = [], False
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("#"):
            inside = line.strip("# ").startswith(title)
        elif inside and line.strip():
            lines.append(line.split(" #", 1)[0].strip())  # pip's inline comments start at " #"
    return lines


def test_runtime_dependencies_agree_with_requirements_txt() -> None:
    runtime = _requirements_section("Runtime")
    assert runtime, "requirements.txt has no '# Runtime' section"
    assert sorted(_pyproject()["project"]["dependencies"]) == sorted(runtime)


def test_optional_extras_cover_the_rest_of_requirements_txt() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    for title, extra in (("Plots", "plot"), ("Tests", "test")):
        section = {_requirement_name(line) for line in _requirements_section(title)}
        assert section and section <= {_requirement_name(line) for line in extras[extra]}, title


def _installed_name(folder: Path) -> str:
    """The package name a source folder installs as: models/ and datasets/ go under ctkd (pyproject's package-dir)."""
    parts = folder.relative_to(REPO_ROOT).parts
    return ".".join(("ctkd", *parts) if parts[0] in ("models", "datasets") else parts)


def test_every_package_of_the_tree_is_installed() -> None:
    """A new subpackage (a folder with __init__.py) must be listed, or `pip install .` would leave it out."""
    found = sorted(
        _installed_name(init.parent)
        for init in REPO_ROOT.glob("**/__init__.py")
        if not {"tests", "build", ".git"} & set(init.relative_to(REPO_ROOT).parts)
        and not any(part.startswith((".", "__")) or part.endswith(".egg-info") for part in init.parent.parts[-1:])
    )
    assert sorted(_pyproject()["tool"]["setuptools"]["packages"]) == found
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == {"ctkd.models": "models", "ctkd.datasets": "datasets"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as `pip install .` puts it into an environment (a --target folder; no dependencies)."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("source") / "ctkd"
    # from a copy of the sources: setuptools leaves build/ and *.egg-info in the folder it builds
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "runs", "data", "build", "*.egg-info", "__pycache__", "tests", "plots", "checkpoints"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return target


@pytest.mark.slow
def test_the_install_adds_no_top_level_package_but_ctkd(installed: Path) -> None:
    top = {p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))} - {"__pycache__"}
    assert top == {"ctkd"}
    assert (installed / "ctkd" / "models" / "cifar" / "resnet.py").is_file()
    assert (installed / "ctkd" / "datasets" / "folder.py").is_file()


@pytest.mark.slow
def test_another_datasets_package_keeps_its_meaning_beside_the_install(installed: Path, tmp_path: Path) -> None:
    """A Hugging Face-style `datasets` in the same environment is the one `import datasets` gives, and ctkd (its
    models and datasets included) still works, from a folder outside the repository."""
    hf = tmp_path / "hf" / "datasets"
    hf.mkdir(parents=True)
    (hf / "__init__.py").write_text("HUGGING_FACE = True\n")
    code = (
        "import datasets\n"
        "assert datasets.HUGGING_FACE, datasets.__file__\n"
        "import ctkd.models, ctkd.datasets, pathlib\n"
        f"assert pathlib.Path(ctkd.models.__file__).is_relative_to({str(installed)!r})\n"
        "net = ctkd.models.build_model('resnet8', num_classes=10)\n"
        "split = ctkd.datasets.build_dataset('synthetic', root='.', train=True, num_classes=4, train_size=8,"
        " test_size=4)\n"
        "print(type(net).__name__, len(split))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(tmp_path / "hf")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CifarResNet", "8"]


def test_python_requirement_matches_ruff_target() -> None:
    assert _pyproject()["project"]["requires-python"] == ">=3.10"
    assert _pyproject()["tool"]["ruff"]["target-version"] == "py310"


@pytest.mark.slow
def test_timm_data_imports_beside_our_datasets_package() -> None:
    """From the repository root the code imports ctkd.datasets, never a top-level `datasets`: timm.data (which
    imports the Hugging Face `datasets` lazily, for its hf readers) imports and builds models beside it."""
    code = (
        "import sys, timm, timm.data, ctkd.datasets, ctkd.models\n"
        "import train\n"  # the entry point and everything it imports
        "assert 'datasets' not in sys.modules and 'models' not in sys.modules, 'a top-level import of ours'\n"
        "timm.data.create_transform(32)\n"
        "model = timm.create_model('resnet18', pretrained=False, num_classes=10)\n"
        "print(type(model).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ResNet"
