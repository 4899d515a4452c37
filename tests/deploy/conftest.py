"""Deploy tests: the image, the compose stack, the Kubernetes manifests and the Helm chart.

They check the shipped files with the tools their users run (hadolint, the compose spec parser,
the Kubernetes JSON schemas) and the paths they name against the repository. Where a Docker engine
is present, ``-m docker`` tests build the image and call its health check.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script installed with the test extra (next to this interpreter), else on PATH."""
    candidate = VENV_BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed; it comes with the test extra (pip install -e '.[test]')"
    return found


def docker_engine() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def docker() -> str:
    if not docker_engine():
        pytest.skip("no Docker engine")
    return shutil.which("docker")
