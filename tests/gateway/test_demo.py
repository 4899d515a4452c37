"""``infergate demo`` (the README's main command) as a real subprocess, with and without Redis."""

from __future__ import annotations

import os
import subprocess
import sys

DEMO_TIMEOUT_S = 120


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "demo"], capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT_S, env=env)


def test_demo_with_redis_serves_both_variants_and_shifts_traffic():
    env = dict(os.environ, COLUMNS="200")
    done = run_demo(env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "started a local redis-server" in out
    before, after = out.split("After the weight change")
    rows_before = [line for line in before.splitlines() if line.startswith("│") and ("v1" in line or "v2" in line)]
    rows_after = [line for line in after.splitlines() if line.startswith("│") and ("v1" in line or "v2" in line)]
    assert len(rows_before) == 12 and len(rows_after) == 4
    assert all("yes" in line for line in rows_before + rows_after)
    assert all("│ v2 " in line for line in rows_after)
    assert "set_weights" in out and "demo: send every call to v2" in out
    assert "Traceback" not in done.stderr


def test_demo_without_redis_says_so_and_still_serves():
    env = dict(os.environ, COLUMNS="200", PATH=os.path.dirname(sys.executable))  # no redis-server on PATH
    done = run_demo(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "running without Redis" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("│") and "yes" in line]
    assert len(rows) == 12
    assert "After the weight change" not in done.stdout
