"""What a regular install needs from pyproject.toml: every module the package imports is a declared dependency.

A dependency that arrives only through another package (httpx2 through huggingface_hub) works until that
package drops or renames it. Building the wheel and publishing the demo from it takes minutes, so that
check is `.ci/wheel_check.py`, a step of `.ci/run` and of CI's test job.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; huggingface_hub depends on tomli there
    import tomli as tomllib

from tests.conftest import ROOT


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(package: Path) -> dict[str, set[str]]:
    """Top-level module name -> the files that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for file in package.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(file.relative_to(package.parent).as_posix())
    return found


def undeclared(package: Path, declared: set[str]) -> dict[str, list[str]]:
    """Third-party modules imported under ``package`` whose distribution is not in ``declared``."""
    distributions = metadata.packages_distributions()
    missing = {}
    for module, files in imported_modules(package).items():
        if module in sys.stdlib_module_names or module == package.name:
            continue
        provided_by = {canonical(name) for name in distributions.get(module, [])}
        if not provided_by & declared:
            missing[module] = sorted(files)
    return missing


def declared_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group()) for requirement in project["dependencies"]}


def test_every_imported_module_is_a_declared_dependency():
    assert undeclared(ROOT / "publisher", declared_dependencies()) == {}


def test_an_undeclared_import_is_found(tmp_path: Path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "hub.py").write_text("import json\nimport httpx2\nfrom huggingface_hub import HfApi\nfrom . import x\n")
    assert undeclared(package, {"huggingface-hub"}) == {"httpx2": ["pkg/hub.py"]}
