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


def test_exported_demo_is_a_starter_that_check_config_accepts_and_serve_serves(tmp_path, gateway_process):
    """`infergate demo --export DIR`, then `serve` on what it wrote (ports moved to free ones)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import yaml

    from infergate.gateway.demo_models import LinearClassifier

    export = tmp_path / "starter"
    done = subprocess.run([sys.executable, "-m", "infergate", "demo", "--export", str(export)],
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert f"next: infergate serve --config {export / 'infergate.yaml'}" in done.stdout
    assert sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()) == [
        "infergate.yaml", "models/classifier_v1.onnx", "models/classifier_v2.onnx",
    ]
    checked = subprocess.run([sys.executable, "-m", "infergate", "check-config", str(export / "infergate.yaml")],
                             capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert checked.returncode == 0 and checked.stdout.startswith("ok: 1 model(s)"), checked.stderr

    config = yaml.safe_load((export / "infergate.yaml").read_text())
    del config["server"]["listen"], config["server"]["metrics_listen"]  # free ports instead of 8001/9091
    for variant in config["models"]["classifier"]["variants"].values():
        variant["path"] = str(export / variant["path"])  # the fixture writes the config elsewhere
    gateway = gateway_process(config)
    row = np.random.default_rng(3).normal(size=(1, 16)).astype(np.float32)
    tensor = grpcclient.InferInput("INPUT", [1, 16], "FP32")
    tensor.set_data_from_numpy(row)
    client = grpcclient.InferenceServerClient(gateway.url)
    try:
        result = client.infer("classifier", [tensor])
    finally:
        client.close()
    variant = result.get_response().parameters["variant"].string_param
    seed = {"v1": 1, "v2": 2}[variant]
    expected = LinearClassifier.random(seed=seed).reference(row)["PROBS"]
    assert np.allclose(result.as_numpy("PROBS"), expected, atol=1e-5)


def test_export_keeps_a_config_the_user_changed_unless_forced(tmp_path):
    export = tmp_path / "starter"

    def demo_export(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "infergate", "demo", "--export", str(export), *more],
                              capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)

    assert demo_export().returncode == 0
    edited = (export / "infergate.yaml").read_text() + "# mine\n"
    (export / "infergate.yaml").write_text(edited)
    kept = demo_export()
    assert kept.returncode == 2 and kept.stderr.strip().endswith("--force to overwrite")
    assert (export / "infergate.yaml").read_text() == edited
    assert demo_export("--force").returncode == 0
    assert "# mine" not in (export / "infergate.yaml").read_text()


def test_the_example_in_the_repository_is_the_starter_that_export_writes():
    from pathlib import Path

    from infergate.gateway.demo import starter_config_text

    root = Path(__file__).resolve().parents[2]
    assert (root / "examples" / "infergate.yaml").read_text(encoding="utf-8") == starter_config_text()
