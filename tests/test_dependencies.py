"""The installed package imports only what pyproject.toml declares.

A development environment holds far more than a user's ``pip install infergate`` (the test extra,
their dependencies): an import of a package that only arrives there, such as ``click`` (typer
0.2x no longer installs it), passes every other test here and breaks the installed command. Every
top-level third-party module imported by the package's code must come from a declared dependency,
an extra, or an extra of a dependency (``pyjwt[crypto]`` -> cryptography).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("gateway", "router", "backends", "benchmarks")
NOT_DECLARED = {
    "pydantic_core": "pydantic's own compiled core, pinned exactly by every pydantic release",
    "tests": "benchmark scenarios reuse the test suite's process helpers: a source checkout only; "
             "`infergate bench --scenario` refuses with that explanation elsewhere",
}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra, rs in project["optional-dependencies"].items()
                     if extra not in ("test", "dev") for r in rs]
    names = set()
    for requirement in requirements:
        names.add(canonicalize_name(requirement.name))
        for extra in requirement.extras:
            for sub in map(Requirement, metadata.requires(requirement.name) or []):
                if sub.marker is not None and sub.marker.evaluate({"extra": extra}):
                    names.add(canonicalize_name(sub.name))
    return names


def imported() -> dict[str, set[str]]:
    """Top-level module names imported by the package's code, with the files that import them."""
    found: dict[str, set[str]] = {}
    for folder in PACKAGE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    allowed = declared()
    distributions = metadata.packages_distributions()
    undeclared = {}
    for module, files in imported().items():
        if module in sys.stdlib_module_names or module == "infergate" or module in NOT_DECLARED:
            continue
        # A module of an extra not installed here (pyarrow) is known by its own name.
        owners = {canonicalize_name(d) for d in distributions.get(module, [])} or {canonicalize_name(module)}
        if not owners & allowed:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_check_sees_an_undeclared_import():
    assert "click" not in declared()  # typer no longer pulls it in: importing it is what broke the CLI once
    assert {"grpcio", "cryptography", "hiredis"} <= declared()  # direct, and an extra of a dependency
