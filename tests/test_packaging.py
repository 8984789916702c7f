"""The project's own files: declared dependencies agree, the code passes its linter, and the
package's import graph runs one way (scripts -> package; sub-packages never import each
other's internals upwards into the scripts)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / "dinov3_cache"
SCRIPTS = ("dinov3_preprocessing", "preprocess_volume", "submit_preprocessing_jobs", "check_preprocessing", "preprocessed_dataloader",
           "probe_features")


def requirement_names(lines) -> dict[str, str]:
    """{normalised name: full requirement} of requirement lines, comments and -r lines left out."""
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0]
            found[name.lower().replace("_", "-")] = line.replace(" ", "")
    return found


def test_pyproject_and_requirements_declare_the_same_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = requirement_names(project["dependencies"])
    listed = requirement_names((REPO / "requirements.txt").read_text().splitlines())
    assert declared == listed


def test_the_package_never_imports_the_scripts():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)} imports {n}" for n in names if n.split(".")[0] in SCRIPTS]
    assert offenders == []


def test_no_sys_path_manipulation_in_tests_or_benchmarks():
    pattern = re.compile(r"sys\.path(\.insert|\.append|\[)")
    offenders = [str(p.relative_to(REPO)) for d in ("tests", "benchmarks") for p in (REPO / d).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.skipif(shutil.which("ruff") is None and subprocess.run(
    [sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0,
    reason="ruff is not installed (pip install -r requirements-test.txt installs it)")
def test_the_code_passes_the_linter():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
