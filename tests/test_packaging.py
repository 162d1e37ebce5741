"""The installed package holds every subpackage of the source tree.

CI installs the project non-editable, so a package folder missing from
``[tool.setuptools] packages`` imports here (editable) and fails there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - py310
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _declared():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(conf["packages"]), conf.get("package-dir", {})


def test_every_package_folder_is_declared():
    packages, package_dir = _declared()
    found = set()
    for name, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            if any(p.startswith(".") or p == "__pycache__" for p in init.relative_to(ROOT).parts):
                continue
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    missing = sorted(found - packages)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"

    def folder(pkg):
        for name, d in sorted(package_dir.items(), key=lambda kv: -len(kv[0])):
            if pkg == name or pkg.startswith(name + "."):
                rest = pkg[len(name):].strip(".")
                return ROOT / d / Path(*rest.split(".")) if rest else ROOT / d
        return ROOT / Path(*pkg.split("."))

    stale = sorted(p for p in packages if not folder(p).is_dir())
    assert not stale, f"pyproject.toml lists packages with no folder: {stale}"


def test_python_subprocesses_of_the_tests_start_outside_the_source_tree():
    """``python -c`` puts the working directory first on ``sys.path``: started in the checkout,
    the source ``zsdense/`` (without ``zsdense.cli``, which installs from ``cli/``) would shadow
    the installed package CI tests. Every subprocess a test starts names its ``cwd``."""
    import ast

    loose = []
    for f in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("run", "Popen", "check_output", "check_call")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "subprocess"
                and "cwd" not in {k.arg for k in node.keywords}
            ):
                loose.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not loose, f"subprocess started without cwd= (in the source tree): {loose}"
