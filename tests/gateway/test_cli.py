"""The command line as a package: version, health, registration, one-line failures, full-width tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infergate.gateway import __version__
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as pb
from infergate.gateway.cli import COMMAND_MODULES, app
from infergate.gateway.cli.admin import _print_routes
from infergate.gateway.local_redis import free_port
from tests.support.models import onnx_config

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
