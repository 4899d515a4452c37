"""The installed layout: one `infergate` package, nothing generic at the top of site-packages, and
imports that point one way (gateway -> router -> backends), checked by import-linter on the built
package (it reads packages from their folders, so it runs on the wheel's layout, not the repo's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("gateway", "router", "backends", "benchmarks")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_in_tree() -> set[str]:
    """Every folder with an __init__.py under the layers, by its installed name."""
    found = {"infergate"}
    for layer in LAYERS:
        for init in (ROOT / layer).rglob("__init__.py"):
            folder = init.parent.relative_to(ROOT)
            if folder.parts[:2] == ("gateway", "_namespace"):
                continue  # installed as `infergate` itself
            found.add("infergate." + ".".join(folder.parts))
    return found


def test_pyproject_names_every_package_in_the_tree():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert listed == _packages_in_tree()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built as pip would (from a copy of the tree, so no build/ is left in the repo)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", *LAYERS):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("infergate-*.whl")
    return built


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_imports_point_one_way(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    done = lint_imports(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


def test_an_import_pointing_up_breaks_the_contract(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    (tmp_path / "infergate" / "backends" / "upward.py").write_text("from infergate.router import batcher\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1
    assert "BROKEN" in done.stdout and "infergate.backends.upward" in done.stdout


def test_wheel_installs_only_the_infergate_package(wheel):
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"infergate"}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "infergate/__main__.py" in names
    assert "infergate/gateway/_proto/inference/grpc_service_pb2.py" in names
    assert "infergate/router/batcher.py" in names


def test_python_dash_m_infergate_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "infergate", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout and "bench" in done.stdout


def test_no_module_is_imported_under_a_bare_layer_name():
    """Importing the package never loads `gateway.*` as a second copy (two metric registries)."""
    code = (
        "import sys, infergate.gateway.server, infergate.gateway.cli, infergate.benchmarks.bench\n"
        "bare = sorted(m for m in sys.modules if m.split('.')[0] in %r)\n"
        "print(','.join(bare))" % (LAYERS,)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
