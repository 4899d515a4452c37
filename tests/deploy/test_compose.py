"""deploy/compose.yaml: valid per the compose spec, and nothing it names is missing from the repo.

Every bind-mounted file or folder and every build context must exist in the repository; named
volumes must be declared; ``depends_on`` must name services of the file. The model repository is
the one path the stack produces itself (``deploy/make_model_repo.py`` in the ``model-repo`` job):
the test runs that script and checks the files the gateway config and Triton expect.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from infergate.gateway.config import load_config
from tests.deploy.conftest import DEPLOY, ROOT

COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"]
STACK = {"gateway", "redis", "triton", "model-repo", "otel-collector", "jaeger", "prometheus", "grafana", "sample-call"}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def bind_sources(service: dict) -> list[str]:
    """Host paths of a service's bind mounts (short syntax ``SRC:DST[:MODE]``; long syntax too)."""
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_the_compose_files_follow_the_compose_spec(path):
    parsed = PyCompose.from_yaml(path.read_text(encoding="utf-8"))
    assert parsed.service_names()


def test_the_stack_has_every_part():
    assert set(compose()["services"]) == STACK


def test_every_bind_mount_and_build_context_exists_in_the_repo():
    missing = []
    for name, service in compose()["services"].items():
        for source in bind_sources(service):
            if not (DEPLOY / source).exists():
                missing.append(f"{name}: {source}")
        build = service.get("build")
        if build is not None:
            context = DEPLOY / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                missing.append(f"{name}: build {dockerfile}")
    assert missing == []


def test_named_volumes_are_declared_and_dependencies_are_services():
    stack = compose()
    declared = set(stack.get("volumes", {}))
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
        depends = service.get("depends_on", [])
        assert set(depends) <= set(stack["services"]), f"{name}: depends on {depends}"


def test_the_gateway_runs_read_only_with_read_only_models_and_its_config():
    gateway = compose()["services"]["gateway"]
    assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    assert "models:/models:ro" in gateway["volumes"]
    assert "./infergate.yaml:/etc/infergate/infergate.yaml:ro" in gateway["volumes"]
    assert compose()["services"]["triton"]["volumes"] == ["models:/models:ro"]


def test_prometheus_loads_the_alert_rules_and_grafana_the_dashboards_from_the_paths_the_repo_uses():
    stack = compose()["services"]
    assert "./prometheus:/etc/prometheus:ro" in stack["prometheus"]["volumes"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    # Relative to prometheus.yml: deploy/prometheus/alerts.yaml, mounted beside it (alerts_test.yaml,
    # promtool's unit tests of the rules, is not a rules file and is not loaded).
    assert prometheus["rule_files"] == ["alerts.yaml"]
    assert (DEPLOY / "prometheus" / "alerts.yaml").is_file()
    assert {job["job_name"] for job in prometheus["scrape_configs"]} >= {"infergate", "triton"}
    assert "./grafana:/var/lib/grafana/dashboards/infergate:ro" in stack["grafana"]["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/infergate.yaml").read_text(encoding="utf-8"))
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/infergate"


def test_the_model_script_writes_every_file_the_gateway_config_and_triton_expect(tmp_path):
    subprocess.run(
        [sys.executable, str(DEPLOY / "make_model_repo.py"), str(tmp_path)], check=True, timeout=120, cwd=ROOT
    )
    config = load_config(DEPLOY / "infergate.yaml")
    for model in config.models.values():
        for variant in model.variants.values():
            if variant.path is not None:  # /models/... inside the containers
                assert (tmp_path / variant.path.relative_to("/models")).is_file(), variant.path
            if variant.model:
                assert (tmp_path / variant.model / "config.pbtxt").is_file(), variant.model
                assert (tmp_path / variant.model / "1" / "model.onnx").is_file(), variant.model
    checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(": OK") == 2


def test_the_gateway_config_points_at_the_compose_services():
    config = load_config(DEPLOY / "infergate.yaml")
    assert config.redis.url == "redis://redis:6379/0"
    assert config.telemetry.otlp_endpoint == "http://otel-collector:4317"
    assert config.backends["triton_gpu"].url == "triton:8001"
    grace_s = compose()["services"]["gateway"]["stop_grace_period"]
    assert float(grace_s.rstrip("s")) > config.server.shutdown_grace_s


def test_every_read_only_service_has_a_writable_tmp():
    for name, service in compose()["services"].items():
        if service.get("read_only"):
            assert "/tmp" in service.get("tmpfs", []), name


@pytest.mark.docker
def test_the_stack_comes_up_with_one_command_and_a_sample_call_goes_through(docker):
    """Where a Docker engine is present: `up --wait` (health checks included), then the sample call."""
    compose_cmd = [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "-p", "infergate-test"]
    try:
        subprocess.run([*compose_cmd, "up", "-d", "--build", "--wait", "--wait-timeout", "600"], check=True, timeout=2400)
        call = subprocess.run([*compose_cmd, "run", "--rm", "sample-call"], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([*compose_cmd, "down", "-v", "--remove-orphans"], capture_output=True, timeout=300)
    assert call.returncode == 0, call.stdout + call.stderr
    assert "model classifier answered through variant" in call.stdout
