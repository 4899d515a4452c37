"""The test tiers: markers come from what a test uses (tests/conftest.py), so `make test-fast` skips
every test that needs Redis, Triton or a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collected(marker: str, *paths: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker, *paths],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: nothing selected
    return {line.split("::", 1)[1] for line in done.stdout.splitlines() if "::" in line}


def test_markers_follow_fixtures_and_process_starts(request):
    config = "tests/gateway/test_config.py"
    triton = "tests/backends/test_triton_backend.py"
    state = "tests/router/test_state.py"
    slow = _collected("redis or triton or subprocess", config, triton, state)  # one collection: it is slow
    assert "test_config_is_frozen" not in slow  # in process, nothing started: the fast tier
    assert "test_check_config_rejects_bad_file[unknown-key]" not in slow  # the CLI in process (CliRunner)
    assert "test_the_installed_command_rejects_a_bad_file_in_one_line" in slow  # through run_cli_process
    assert "test_startup_problem_exits_1_with_one_line" in slow
    assert "test_infer_matches_the_reference" in slow  # triton_server
    assert "test_a_change_reaches_another_replica_within_a_second" in slow  # redis_url
    assert {m.name for m in request.node.iter_markers()} >= {"subprocess"}  # this test runs pytest
