"""The installed layout: one `infergate` package, nothing generic at the top of site-packages."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

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


def test_wheel_installs_only_the_infergate_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("infergate-*.whl")
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
