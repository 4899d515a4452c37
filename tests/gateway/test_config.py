"""Configuration: bad files exit 2 with one line naming the key, env overrides, relative paths.

The command-line cases run ``check-config FILE`` and ``serve --config FILE`` in process through
typer's CliRunner (a config error must stop ``serve`` before it binds anything, so those return at
once); the cases where ``serve`` really starts, and one bad file, run the installed ``infergate``
console script as a real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from infergate.gateway.config import ConfigError, GatewayConfig, load_config, parse_config
from tests.support.models import onnx_config
from tests.support.processes import ROOT

INFERGATE = Path(sys.executable).with_name("infergate")
CLI_TIMEOUT_S = 60.0


def run_cli_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script in a process of its own, without the caller's INFERGATE_ variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")}
    environment.update(env or {})
    return subprocess.run(
        [str(INFERGATE), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=environment, cwd=ROOT
    )


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The same command in this process (typer's CliRunner), with the same environment rules."""
    from typer.testing import CliRunner

    from infergate.gateway.cli import app

    environment: dict[str, str | None] = {k: None for k in os.environ if k.startswith("INFERGATE_")}
    environment.update(env or {})
    result = CliRunner().invoke(app, list(args), env=environment)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the user would have seen
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


GOOD_MODELS = """
backends:
  onnx_cpu: {kind: onnx}
models:
  m:
    variants:
      v1: {backend: onnx_cpu, path: m.onnx, weight: 1}
"""


def with_models(extra: str) -> str:
    """GOOD_MODELS with more keys under ``models.m`` (indented by four spaces)."""
    return GOOD_MODELS + extra


BAD_CONFIGS = [
    ("not-yaml", "server:\n  listen: [unclosed\n", ["not valid YAML", "line"]),
    ("tabs-not-yaml", "server:\n\tlisten: x\n", ["not valid YAML"]),
    ("top-level-list", "- server\n- models\n", ["top level must be a mapping"]),
    ("top-level-scalar", "just words\n", ["top level must be a mapping"]),
    ("unknown-key", "server:\n  listn: 127.0.0.1:1\n", ["server.listn: unknown key; did you mean 'listen'?"]),
    ("unknown-batching-key", with_models("    batching: {max_delay_ms: 2}\n"), ["models.m.batching.max_delay_ms: unknown key; did you mean 'max_delay_us'?"]),
    ("unknown-section", "servre: {}\n", ["servre"]),
    ("wrong-type", "server:\n  workers: many\n", ["server.workers", "integer"]),
    ("section-not-mapping", "server: 5\n", ["server"]),
    ("out-of-range", "server:\n  max_message_bytes: 10\n", ["server.max_message_bytes"]),
    ("bad-listen", "server:\n  listen: localhost\n", ["server.listen", "host:port"]),
    ("bad-listen-port", "server:\n  listen: '0.0.0.0:99999'\n", ["server.listen"]),
    ("bad-metrics-listen", "server:\n  metrics_listen: nowhere\n", ["server.metrics_listen"]),
    ("unknown-backend-kind", "backends:\n  b: {kind: gpu}\n", ["backends.b", "kind"]),
    (
        "variant-unknown-backend",
        "models:\n  m:\n    variants:\n      v1: {backend: nope, weight: 1}\n",
        ["models.m.variants.v1.backend", "unknown backend"],
    ),
    (
        "onnx-variant-without-path",
        "backends: {cpu: {kind: onnx}}\nmodels:\n  m:\n    variants:\n      v1: {backend: cpu, weight: 1}\n",
        ["models.m.variants.v1.path", "required"],
    ),
    (
        "triton-variant-without-model",
        "backends: {gpu: {kind: triton, url: '127.0.0.1:1'}}\nmodels:\n  m:\n    variants:\n      v1: {backend: gpu, weight: 1}\n",
        ["models.m.variants.v1.model", "required"],
    ),
    (
        "all-zero-weights",
        GOOD_MODELS.replace("weight: 1", "weight: 0") + "      v2: {backend: onnx_cpu, path: m.onnx, weight: 0}\n",
        ["models.m", "zero"],
    ),
    ("no-variants", "models:\n  m:\n    variants: {}\n", ["models.m", "variants"]),
    ("unknown-fallback", GOOD_MODELS.replace("weight: 1}", "weight: 1, fallback: v9}"), ["models.m", "fallback", "v9"]),
    ("negative-weight", GOOD_MODELS.replace("weight: 1", "weight: -5"), ["models.m.variants.v1.weight"]),
    ("shadow-unknown-variant", with_models("    shadow: {variant: v7, percent: 5}\n"), ["shadow", "v7"]),
    (
        "hs256-mixed-with-rs256",
        "auth:\n  mode: jwt\n  issuer: i\n  audience: a\n  algorithms: [HS256, RS256]\n  hs256_secret_env: SECRET\n",
        ["auth", "HS256"],
    ),
    (
        "jwt-without-key-source",
        "auth:\n  mode: jwt\n  issuer: i\n  audience: a\n  algorithms: [RS256]\n",
        ["auth", "jwks"],
    ),
    ("tls-cert-missing", "server:\n  tls: {cert_file: nope.pem, key_file: nope.key}\n", ["server.tls", "cert_file"]),
]


@pytest.fixture(params=BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def bad_config(request, tmp_path) -> tuple[Path, list[str]]:
    _name, text, says = request.param
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    return path, says


def assert_one_line_config_error(result: subprocess.CompletedProcess, says: list[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("infergate: config error: "), lines[0]
    for fragment in says:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    assert "Traceback" not in result.stderr + result.stdout
    assert "listening" not in result.stdout


def test_check_config_rejects_bad_file(bad_config):
    path, says = bad_config
    assert_one_line_config_error(run_cli("check-config", str(path)), says)


def test_serve_rejects_bad_file_before_starting(bad_config):
    path, says = bad_config
    assert_one_line_config_error(run_cli("serve", "--config", str(path)), says)


def test_the_installed_command_rejects_a_bad_file_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  listn: 127.0.0.1:1\n", encoding="utf-8")
    for command in (["check-config"], ["serve", "--config"]):
        assert_one_line_config_error(run_cli_process(*command, str(path)), ["server.listn: unknown key"])


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--config"]], ids=["check-config", "serve"])
def test_missing_file_not_utf8_and_directory_exit_2(tmp_path, command):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00server: {}\n")
    cases = [
        (tmp_path / "absent.yaml", ["absent.yaml", "cannot read"]),
        (binary, ["binary.yaml", "UTF-8"]),
        (tmp_path, ["cannot read"]),
    ]
    for path, says in cases:
        assert_one_line_config_error(run_cli(*command, str(path)), says)


def test_check_config_accepts_a_good_file(tmp_path, model_paths):
    path = write_yaml(tmp_path / "good.yaml", onnx_config(model_paths))
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok: 3 model(s), 1 backend(s)" in result.stdout


def test_bad_environment_override_exits_2_naming_the_key(tmp_path, model_paths):
    path = write_yaml(tmp_path / "good.yaml", onnx_config(model_paths))
    result = run_cli("check-config", str(path), env={"INFERGATE_SERVER__WORKERS": "lots"})
    assert_one_line_config_error(result, ["server.workers"])
    result = run_cli("serve", "--config", str(path), env={"INFERGATE_SERVER__LISTEN": "[unclosed"})
    assert_one_line_config_error(result, ["server.listen", "[unclosed"])
    result = run_cli("check-config", str(path), env={"INFERGATE_BACKENDS__ONNX_CPU__PROVIDERS": "{not: a list}"})
    assert_one_line_config_error(result, ["backends.onnx_cpu.providers"])
    result = run_cli("check-config", str(path), env={"INFERGATE_MODELS__LINEAR__VARIANTS__V1__WEIGHT": "0"})
    assert_one_line_config_error(result, ["models.linear", "zero"])


def test_serve_takes_its_listen_address_from_the_environment(gateway_process, model_paths):
    from infergate.gateway.local_redis import free_port
    from tests.e2e.conftest import assert_serves

    port = free_port()
    gateway = gateway_process(onnx_config(model_paths), name="env-listen", extra_env={"INFERGATE_SERVER__LISTEN": f"127.0.0.1:{port}"})
    assert gateway.port == port  # the file said another free port; the environment wins
    assert_serves(gateway.url)


def test_startup_problem_exits_1_with_one_line(tmp_path, model_paths):
    """Valid config, unusable model file: not a config error (2) but a start failure (1), no traceback."""
    config = onnx_config(model_paths)
    config["models"]["linear"]["variants"]["v1"]["path"] = str(tmp_path / "missing.onnx")
    config["server"] = {"listen": "127.0.0.1:0", "metrics_listen": ""}
    result = run_cli_process("serve", "--config", str(write_yaml(tmp_path / "c.yaml", config)))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("infergate: cannot start: models.linear.variants.v1"), last
    assert "missing.onnx" in last


def test_check_config_catches_the_missing_model_file_that_serve_would_reject(tmp_path, model_paths):
    config = onnx_config(model_paths)
    config["models"]["linear"]["variants"]["v1"]["path"] = str(tmp_path / "missing.onnx")
    result = run_cli("check-config", str(write_yaml(tmp_path / "c.yaml", config)))
    assert_one_line_config_error(result, ["models.linear.variants.v1.path: model file not found: ", "missing.onnx"])


def test_listen_address_in_use_exits_1_with_one_line(tmp_path, model_paths):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = dict(onnx_config(model_paths), server={"listen": f"127.0.0.1:{port}", "metrics_listen": ""})
        result = run_cli_process("serve", "--config", str(write_yaml(tmp_path / "c.yaml", config)))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(f"infergate: cannot start: server.listen: cannot bind 127.0.0.1:{port}")


# -- load_config in process ------------------------------------------------------------------


def write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_environment_overrides_file_values_and_fills_missing_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD_MODELS + "server:\n  default_deadline_ms: 10000\n", encoding="utf-8")
    environ = {
        "INFERGATE_SERVER__DEFAULT_DEADLINE_MS": "250",
        "INFERGATE_SERVER__METRICS_LISTEN": "",
        "INFERGATE_BACKENDS__ONNX_CPU__PROVIDERS": "[CUDAExecutionProvider, CPUExecutionProvider]",
        "INFERGATE_BACKENDS__ONNX_CPU__INTRA_OP_THREADS": "3",
        "INFERGATE_TELEMETRY__SAMPLE_RATIO": "0.25",
        "INFERGATE_REDIS__URL": "redis://127.0.0.1:6390/2",
        "INFERGATE_MODELS__M__VARIANTS__V1__WEIGHT": "7",
        # CLI settings, not config: ignored by the loader
        "INFERGATE_TOKEN": "not-config",
        "INFERGATE_GATEWAY": "127.0.0.1:1",
        "OTHER__THING": "x",
    }
    config = load_config(path, environ=environ)
    assert config.server.default_deadline_ms == 250
    assert config.server.metrics_listen == ""
    backend = config.backends["onnx_cpu"]
    assert backend.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert backend.intra_op_threads == 3
    assert config.telemetry.sample_ratio == 0.25
    assert config.redis.url == "redis://127.0.0.1:6390/2"
    assert config.models["m"].variants["v1"].weight == 7
    assert config.server.listen == "0.0.0.0:8001"  # untouched defaults stay


@pytest.mark.parametrize(
    "name, value, read",
    [
        ("INFERGATE_SERVER__LISTEN", "[::]:8001", lambda c: c.server.listen),
        ("INFERGATE_TELEMETRY__SERVICE_NAME", "gateway #1", lambda c: c.telemetry.service_name),
        ("INFERGATE_TELEMETRY__SERVICE_NAME", "on", lambda c: c.telemetry.service_name),
        ("INFERGATE_AUTH__AUDIENCE", "12345", lambda c: c.auth.audience),
        ("INFERGATE_REDIS__URL", "redis://:p#ss@10.0.0.1:6379/0", lambda c: c.redis.url),
    ],
    ids=["ipv6-listen", "hash-sign", "yaml-boolean-word", "digits", "url-with-hash"],
)
def test_environment_strings_stay_strings(name, value, read):
    """Values are not YAML: a string field gets exactly the text of the variable."""
    assert read(load_config(None, environ={name: value})) == value


def test_environment_numbers_and_sexagesimal_lookalikes():
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"INFERGATE_SERVER__DEFAULT_DEADLINE_MS": "10:30"})
    assert str(err.value).startswith("server.default_deadline_ms:")  # not silently 630 (YAML 1.1 base 60)
    assert load_config(None, environ={"INFERGATE_SERVER__SHUTDOWN_GRACE_S": "2.5"}).server.shutdown_grace_s == 2.5


def test_environment_override_of_an_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD_MODELS, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"INFERGATE_SERVER__LISTN": "127.0.0.1:1"})
    assert str(err.value).startswith("server.listn:")


def test_environment_alone_without_a_file(tmp_path):
    config = load_config(None, environ={"INFERGATE_SERVER__DEFAULT_DEADLINE_MS": "1234"})
    assert config.server.default_deadline_ms == 1234
    assert config.models == {}


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path):
    folder = tmp_path / "deploy" / "conf"
    (folder / "certs").mkdir(parents=True)
    for name in ("server.pem", "server.key", "ca.pem"):
        (folder / "certs" / name).write_text("x", encoding="utf-8")
    path = folder / "gateway.yaml"
    path.write_text(
        textwrap.dedent(
            """
            server:
              tls: {cert_file: certs/server.pem, key_file: certs/server.key, client_ca_file: certs/ca.pem}
            auth: {mode: jwt, issuer: i, audience: a, algorithms: [RS256], jwks_file: keys/jwks.json}
            backends:
              cpu: {kind: onnx}
            models:
              m:
                variants:
                  rel: {backend: cpu, path: models/m.onnx, weight: 1}
                  up: {backend: cpu, path: ../shared/m2.onnx, weight: 1}
                  abs: {backend: cpu, path: /opt/models/m3.onnx, weight: 1}
            """
        ),
        encoding="utf-8",
    )
    assert Path.cwd() != folder
    config = load_config(path, environ={})
    variants = config.models["m"].variants
    assert variants["rel"].path == folder.resolve() / "models" / "m.onnx"
    assert variants["up"].path.resolve() == (tmp_path / "deploy" / "shared" / "m2.onnx").resolve()
    assert variants["abs"].path == Path("/opt/models/m3.onnx")
    assert config.server.tls.cert_file == folder.resolve() / "certs" / "server.pem"
    assert config.server.tls.client_ca_file == folder.resolve() / "certs" / "ca.pem"
    assert config.auth.jwks_file == folder.resolve() / "keys" / "jwks.json"


def test_config_is_frozen(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD_MODELS, encoding="utf-8")
    config = load_config(path, environ={})
    with pytest.raises(ValidationError):
        config.server.listen = "0.0.0.0:1"  # type: ignore[misc]
    assert config.server.listen == "0.0.0.0:8001"


def test_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path, environ={}) == GatewayConfig()


DESIGN_EXAMPLE = """
server:
  listen: "0.0.0.0:8001"
  metrics_listen: "0.0.0.0:9091"
  workers: 1
  max_message_bytes: 67108864
  max_concurrent_rpcs: 10000
  default_deadline_ms: 10000
auth:
  mode: jwt
  issuer: "https://auth.example.com"
  audience: "infergate"
  algorithms: [RS256, ES256]
  jwks_file: keys/jwks.json
  leeway_s: 30
  tenant_claim: sub
  rate_limit_per_tenant_rps: 0
redis:
  url: "redis://127.0.0.1:6379/0"
telemetry:
  service_name: infergate
  otlp_endpoint: "http://127.0.0.1:4317"
  sample_ratio: 1.0
backends:
  triton_gpu: {kind: triton, url: "127.0.0.1:8001", timeout_ms: 2000}
  onnx_cpu:   {kind: onnx, providers: [CPUExecutionProvider], intra_op_threads: 1}
feature_views:
  user_profile:
    key_template: "user_profile:{id}"
    encoding: float32
    dim: 16
    on_missing: zeros
    on_error: fail
    timeout_ms: 20
models:
  fraud:
    features: {view: user_profile, entity_input: USER_ID, feature_input: FEATURES}
    batching: {max_batch_size: 64, max_delay_us: 1000, max_queue: 4096}
    routing:  {sticky_key: user_id}
    variants:
      v1:     {backend: triton_gpu, model: fraud_v1, weight: 90, fallback: v1_cpu}
      v1_cpu: {backend: onnx_cpu, path: models/fraud_v1.onnx, weight: 0}
      v2:     {backend: onnx_cpu, path: models/fraud_v2.onnx, weight: 10}
    shadow: {variant: v2, percent: 5}
    canary:
      candidate: v2
      steps_percent: [5, 25, 50, 100]
      interval_s: 60
      min_requests: 200
      max_error_rate_increase: 0.01
      max_p99_latency_ratio: 1.5
"""


def test_the_design_example_loads(tmp_path):
    """The full example config (every section, without its optional TLS files) is valid as written."""
    path = tmp_path / "infergate.yaml"
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
    config = load_config(path, environ={})
    fraud = config.models["fraud"]
    assert list(fraud.variants) == ["v1", "v1_cpu", "v2"]
    assert fraud.baseline == "v1"
    assert fraud.variants["v1"].fallback == "v1_cpu"
    assert fraud.variants["v2"].path == tmp_path.resolve() / "models" / "fraud_v2.onnx"
    assert config.backends["triton_gpu"].timeout_ms == 2000
    assert config.auth.algorithms == ("RS256", "ES256")


def test_workers_auto_is_one_per_cpu_this_process_may_use():
    config = parse_config({"server": {"workers": "auto"}})
    assert config.server.workers == len(os.sched_getaffinity(0))
    assert parse_config({"server": {"workers": "AUTO"}}).server.workers == config.server.workers
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"workers": "most"}})
    assert "server.workers" in str(err.value)
