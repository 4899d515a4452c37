"""``infergate demo`` (the README's main command) as a real subprocess, with and without Redis."""

from __future__ import annotations

import os
import subprocess
import sys

DEMO_TIMEOUT_S = 120


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infergate", "demo"], capture_output=True, text=True,
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


def test_demo_serve_stops_cleanly_on_sigterm_and_leaves_no_redis():
    import re
    import signal
    import socket
    import time

    process = subprocess.Popen([sys.executable, "-m", "infergate", "demo", "--serve"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"))
    lines = []
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        for line in process.stdout:
            lines.append(line)
            if "Serving until" in line or time.monotonic() > deadline:
                break
        output = "".join(lines)
        assert "Serving until" in output, output
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", output).group(1))
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with socket.socket() as sock:  # the demo's redis-server is gone with it
        assert sock.connect_ex(("127.0.0.1", redis_port)) != 0
