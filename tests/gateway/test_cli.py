"""The command line as a package: version, health, registration, one-line failures, full-width tables;
the admin commands against a real gateway: stale routes when its Redis is killed, canary status with
the baseline's numbers beside the candidate's and steps numbered alike in text and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from typer.testing import CliRunner

from infergate.gateway import __version__
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as pb
from infergate.gateway.cli import COMMAND_MODULES, app
from infergate.gateway.cli.admin import _print_routes
from infergate.gateway.local_redis import LocalRedis, free_port
from tests.e2e.conftest import linear_input
from tests.support.models import onnx_config
from tests.support.processes import wait_until

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
EXPECTED_COMMANDS = {
    "serve", "demo", "check-config", "health", "routes", "audit", "canary", "features", "monitor", "token", "jwks",
    "bench",
}


def _registered() -> set[str]:
    import typer.main

    return set(typer.main.get_command(app).commands)


def test_every_command_is_registered_once_from_the_cli_package():
    assert _registered() == EXPECTED_COMMANDS
    for module in COMMAND_MODULES:
        assert module.__name__.startswith("infergate.gateway.cli.")
    legacy = [ROOT / "gateway" / name for name in ("cli.py", "cli_admin.py", "cli_features.py", "cli_monitor.py")]
    assert not [path for path in legacy + [ROOT / "gateway" / "auth" / "commands.py"] if path.exists()]


def test_admin_commands_take_the_connection_options_declared_once():
    import inspect

    import typer.main

    from infergate.gateway.cli import admin

    group = typer.main.get_command(app)
    commands = [group.commands["routes"], group.commands["audit"], *group.commands["canary"].commands.values()]
    assert len(commands) == 6
    for command in commands:
        options = [opt for param in command.params for opt in param.opts]
        for name in ("--gateway", "--token", "--json", "--ca-file", "--cert-file", "--key-file", "--timeout-s"):
            assert options.count(name) == 1, (command.name, name)
        assert "--install-completion" not in options
    assert inspect.getsource(admin).count('"--gateway"') == 1


def test_version_is_printed_by_the_installed_command():
    done = subprocess.run([sys.executable, "-m", "infergate", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"infergate {__version__}\n"


def test_shell_completion_is_offered():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_health_is_0_when_serving_and_1_with_one_line_otherwise(gateway_process, model_paths):
    gateway = gateway_process(onnx_config(model_paths))

    serving = runner.invoke(app, ["health", "--gateway", gateway.url])
    unknown = runner.invoke(app, ["health", "--gateway", gateway.url, "--service", "no.such.Service"])
    down = runner.invoke(app, ["health", "--gateway", f"127.0.0.1:{free_port()}", "--timeout-s", "2"])

    assert serving.exit_code == 0, serving.output
    assert serving.stdout == f"{gateway.url}: SERVING\n"
    assert unknown.exit_code == 1
    assert "NOT_FOUND" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    assert down.exit_code == 1
    assert down.stderr.startswith("infergate: 127.0.0.1:") and "UNAVAILABLE" in down.stderr
    assert down.exception is None or isinstance(down.exception, SystemExit)  # no traceback


def test_health_of_the_named_inference_service(gateway_process, model_paths):
    gateway = gateway_process(onnx_config(model_paths))
    done = subprocess.run(
        [sys.executable, "-m", "infergate", "health", "--gateway", gateway.url, "--service", "inference.GRPCInferenceService"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("inference.GRPCInferenceService: SERVING")


def test_parquet_without_pyarrow_is_one_line_before_any_work(tmp_path, model_paths):
    try:
        import pyarrow  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        pytest.skip("pyarrow is installed here: the missing-extra message cannot be reached")
    parquet = tmp_path / "rows.parquet"
    parquet.write_bytes(b"PAR1")
    result = runner.invoke(app, ["features", "load", "view", str(parquet), "--config", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert result.stderr == "infergate: reading Parquet needs pyarrow, which is not installed: pip install 'infergate[parquet]'\n"


def test_route_tables_are_never_truncated_when_piped(capsys):
    route = pb.Route(
        model="scoring-model-with-a-long-name", revision=12, baseline="v1-baseline-variant",
        variants=[
            pb.VariantState(name="v1-baseline-variant", weight=90, health="healthy", backend="onnx_cpu_backend_name"),
            pb.VariantState(name="v2-candidate-variant", weight=10, health="healthy", backend="onnx_cpu_backend_name",
                            fallback="triton-fallback-variant"),
        ],
    )
    _print_routes([route])
    out = capsys.readouterr().out
    for text in ("scoring-model-with-a-long-name", "v1-baseline-variant", "v2-candidate-variant", "onnx_cpu_backend_name",
                 "triton-fallback-variant", "90.0%"):
        assert text in out
    assert "…" not in out and "..." not in out
    assert max(len(line) for line in out.splitlines()) > 80  # wider than rich's default for a pipe


def test_token_with_default_issuer_and_audience_warns_on_stderr_and_prints_the_token_alone(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "dev.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    defaults = subprocess.run([sys.executable, "-m", "infergate", "token", "--key", str(key)],
                              capture_output=True, text=True, timeout=60)
    explicit = subprocess.run([sys.executable, "-m", "infergate", "token", "--key", str(key), "--issuer", "me", "--audience", "gw"],
                              capture_output=True, text=True, timeout=60)
    assert defaults.returncode == 0 and explicit.returncode == 0, defaults.stderr + explicit.stderr
    assert len(defaults.stdout.strip().split(".")) == 3 and "\n" not in defaults.stdout.strip()  # a JWT, alone
    assert "issuer 'infergate-dev' and audience 'infergate' are development defaults" in defaults.stderr
    assert "--config FILE" in defaults.stderr
    assert explicit.stderr == ""


WAIT_S = 30.0
X = np.random.default_rng(11).normal(size=(1, 16)).astype(np.float32)


def admin_cli(*args: str):
    """An admin command as the user types it; never a traceback."""
    result = runner.invoke(app, list(args), env={"COLUMNS": "100", "INFERGATE_TOKEN": ""})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_routes_of_a_replica_whose_redis_was_killed_are_shown_stale(gateway_process, model_paths):
    redis_server = LocalRedis().start()
    try:
        gateway = gateway_process(dict(onnx_config(model_paths), redis={"url": redis_server.url}))
        changed = admin_cli("canary", "set", "ab", "v1=30", "v2=70", "--gateway", gateway.url, "--json")
        assert changed.exit_code == 0, changed.output
        live = json.loads(admin_cli("routes", "ab", "--gateway", gateway.url, "--json").stdout)["routes"][0]
        assert live["stale"] is False and live["stale_since_unix_s"] == 0

        redis_server.process.kill()
        redis_server.process.wait()
        killed = time.time()

        def stale_routes():
            listed = admin_cli("routes", "--gateway", gateway.url, "--json")
            assert listed.exit_code == 0, listed.output  # answered, not UNAVAILABLE
            routes = json.loads(listed.stdout)["routes"]
            return routes if all(route["stale"] for route in routes) else None

        routes = {route["model"]: route for route in wait_until(stale_routes, WAIT_S, what="routes marked stale")}
        text = admin_cli("routes", "--gateway", gateway.url)
        refused = admin_cli("canary", "rollback", "ab", "--gateway", gateway.url)
    finally:
        redis_server.stop()
    assert sorted(routes) == ["ab", "echo", "linear"]
    ab = routes["ab"]
    assert {v["name"]: v["weight"] for v in ab["variants"]} == {"v1": 30, "v2": 70}  # what it serves, from memory
    assert ab["revision"] == live["revision"]
    assert killed - 5 <= ab["stale_since_unix_s"] <= time.time()
    assert ab["replica"] and ab["replica"].split(":")[1] == str(gateway.process.pid)
    assert text.exit_code == 0
    first = text.stdout.splitlines()[0]
    assert first.startswith(f"STALE: {ab['replica']} cannot reach the route store (Redis) since ")
    assert "STALE routes (Redis unreachable)" in text.stdout
    assert "30.0%" in text.stdout and "70.0%" in text.stdout and "stale" in text.stdout.split("STALE routes")[1]
    assert refused.exit_code == 1 and refused.stderr.startswith("infergate: UNAVAILABLE: ")  # changes still need Redis


def test_canary_status_gives_the_baseline_beside_the_candidate_and_numbers_steps_alike(gateway_process, model_paths,
                                                                                        redis_url):
    config = onnx_config(model_paths)
    config["redis"] = {"url": redis_url}
    config["models"]["ab"]["canary"] = {
        "candidate": "v2", "steps_percent": [20, 50, 100], "interval_s": 1.0, "min_requests": 3,
        "max_error_rate_increase": 0.5, "max_p99_latency_ratio": 1000, "lease_ttl_s": 2.0,
    }
    gateway = gateway_process(config)

    def status() -> dict:
        done = admin_cli("canary", "status", "ab", "--gateway", gateway.url, "--json")
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)["canary"]

    with grpcclient.InferenceServerClient(gateway.url) as client:
        def at_step_2():
            for _ in range(10):
                client.infer("ab", [linear_input(X)], client_timeout=30)
            current = status()
            return current if current["step"] >= 2 else None

        stepped = wait_until(at_step_2, WAIT_S, interval_s=0.0, what="the canary's second step")
    # No calls from here on: windows without candidate calls are not judged, so the run waits at step 2.
    waiting = wait_until(lambda: (s := status())["last_window"].get("verdict") == "waiting" and s, WAIT_S,
                         what="an empty window judged")
    text = admin_cli("canary", "status", "ab", "--gateway", gateway.url)

    assert (stepped["step"], stepped["steps"], stepped["state"], stepped["current_percent"]) == (2, 3, "progressing", 50)
    window = stepped["last_window"]
    assert window["verdict"] == "healthy" and window["length_s"] == 1.0
    assert (window["baseline"]["variant"], window["candidate"]["variant"]) == ("v1", "v2")
    assert int(window["candidate"]["requests"]) >= 3 and int(window["baseline"]["requests"]) > 0
    assert window["baseline"]["p99_ms"] > 0 and window["candidate"]["p99_ms"] > 0
    assert stepped["last_reason"].startswith("step 2/3 to 50%: candidate healthy [candidate ")
    assert "| baseline " in stepped["last_reason"]
    assert stepped["limits"]["min_requests"] == 3 and stepped["limits"]["max_error_rate_increase"] == 0.5
    assert "step_index" not in stepped

    assert (waiting["step"], waiting["steps"]) == (2, 3)
    assert text.exit_code == 0, text.output
    assert "canary of v2: progressing, step 2/3, 50% | leader: " in text.stdout
    assert "last judged window " in text.stdout and "UTC: waiting" in text.stdout
    rows = [line for line in text.stdout.splitlines() if "baseline" in line and "v1" in line or "candidate" in line and "v2" in line]
    assert any("baseline" in row for row in rows) and any("candidate" in row for row in rows)
    assert "judged when the candidate has 3 calls: error ratio <= baseline + 0.5, p99 <= 1000 x baseline" in text.stdout
    assert "last: waiting for data: 0 of 3 candidate calls [candidate 0 calls" in text.stdout
