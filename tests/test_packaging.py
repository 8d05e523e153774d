"""The repository installs as a package and coexists with the libraries it is used with."""
from __future__ import annotations

import re
import subprocess
import sys

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
    """The requirement lines of requirements.txt under the comment `# {title}` (up to the next comment)."""
    lines, inside = [], False
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("#"):
            inside = line.strip("# ").startswith(title)
        elif inside and line.strip():
            lines.append(line.strip())
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


def test_every_package_of_the_tree_is_installed() -> None:
    """A new subpackage (a folder with __init__.py) must be listed, or `pip install .` would leave it out."""
    found = sorted(
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for init in REPO_ROOT.glob("**/__init__.py")
        if not {"tests", "build", ".git"} & set(init.relative_to(REPO_ROOT).parts)
        and not any(part.startswith((".", "__")) or part.endswith(".egg-info") for part in init.parent.parts[-1:])
    )
    assert sorted(_pyproject()["tool"]["setuptools"]["packages"]) == found


def test_python_requirement_matches_ruff_target() -> None:
    assert _pyproject()["project"]["requires-python"] == ">=3.10"
    assert _pyproject()["tool"]["ruff"]["target-version"] == "py310"


def test_timm_data_imports_beside_our_datasets_package() -> None:
    """From the repository root our top-level `datasets` comes first on sys.path; timm.data (which imports the
    Hugging Face `datasets` lazily, only for its hf readers) must still import and build models."""
    code = (
        "import datasets, timm, timm.data, pathlib\n"
        "assert pathlib.Path(datasets.__file__).resolve().parent == pathlib.Path.cwd() / 'datasets'\n"
        "timm.data.create_transform(32)\n"
        "model = timm.create_model('resnet18', pretrained=False, num_classes=10)\n"
        "print(type(model).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ResNet"
