"""The image: hadolint clean, multi-stage, non-root, protobuf generated in the build, a gRPC health
check; and, where a Docker engine is present, a build whose health check passes on a read-only root.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import pytest

from tests.deploy.conftest import ROOT, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_hadolint_finds_nothing_at_any_level():
    result = subprocess.run(
        [tool("hadolint"), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_the_only_ignored_rule_is_explained():
    """Each `hadolint ignore` comes right after a comment that says why."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore" in line]
    assert [lines[i].split("=", 1)[1] for i in ignores] == ["DL3008"]
    for i in ignores:
        assert lines[i - 1].startswith("#") and "pins" in lines[i - 1]


def test_the_build_is_multi_stage_non_root_and_generates_the_protobuf_code():
    steps = instructions()
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert [stage.split()[-1] for stage in stages] == ["base", "build", "runtime"]
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "scripts/gen_protos.py" in runs
    assert "grpcio-tools==1.81.1" in runs  # the pin pyproject.toml's dev extra uses
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users == ["10001:10001"]
    assert steps[-1] == ("CMD", '["serve", "--config", "/etc/infergate/infergate.yaml"]')
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "gateway/_proto/" in ignored  # so the image cannot ship a stale copy


def test_the_health_check_asks_the_grpc_health_service_through_the_cli():
    [check] = [args for keyword, args in instructions() if keyword == "HEALTHCHECK"]
    assert check.endswith('CMD ["infergate", "health", "--gateway", "127.0.0.1:8001"]')


def test_a_build_arg_selects_a_cuda_base_with_the_gpu_extra():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "--build-arg BASE=nvidia/cuda:" in text and "--build-arg EXTRA=gpu" in text
    assert '".[${EXTRA}]"' in text


@pytest.mark.docker
def test_the_image_builds_and_reports_healthy_on_a_read_only_root(docker, tmp_path):
    """Builds the image, runs it read-only with a model and a config, waits for Docker's health status."""
    from infergate.gateway.demo_models import LinearClassifier

    tag = f"infergate-test:{uuid.uuid4().hex[:8]}"
    LinearClassifier.random(seed=1).save(tmp_path / "models" / "m.onnx")
    (tmp_path / "infergate.yaml").write_text(
        "server: {listen: '0.0.0.0:8001', metrics_listen: ''}\n"
        "backends: {onnx_cpu: {kind: onnx}}\n"
        "models: {m: {variants: {v1: {backend: onnx_cpu, path: /models/m.onnx, weight: 1}}}}\n"
    )
    subprocess.run([docker, "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
    name = f"infergate-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [docker, "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
         "--health-interval", "2s", "--health-start-period", "5s",
         "-v", f"{tmp_path / 'infergate.yaml'}:/etc/infergate/infergate.yaml:ro",
         "-v", f"{tmp_path / 'models'}:/models:ro", tag],
        check=True, timeout=120,
    )  # fmt: skip
    try:
        status, deadline = "", time.monotonic() + 120
        while status != "healthy" and time.monotonic() < deadline:
            time.sleep(2)
            status = subprocess.run(
                [docker, "inspect", "-f", "{{.State.Health.Status}}", name], capture_output=True, text=True
            ).stdout.strip()
        user = subprocess.run([docker, "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run([docker, "rmi", "-f", tag], capture_output=True, timeout=60)
    assert status == "healthy"
    assert user == "10001"
