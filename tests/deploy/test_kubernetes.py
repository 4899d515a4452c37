"""deploy/k8s/ and the Helm chart: valid against the Kubernetes schemas (kubernetes-validate
--strict, offline with its bundled schemas), and holding what an SRE relies on: gRPC probes,
resources, a restrictive security context, a grace period longer than the drain, config from a
ConfigMap and keys from Secrets, a headless Service, HPA, PDB, NetworkPolicy and a persistent Redis.

No helm binary installs from PyPI or Debian, so the chart is rendered by ``chart_render`` (which
refuses template constructs it does not implement); where ``helm`` is on PATH, ``helm lint`` and
``helm template`` run too and must agree.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infergate.gateway.config import load_config
from tests.deploy.chart_render import Renderer, TemplateError, parse
from tests.deploy.conftest import DEPLOY, tool

K8S = DEPLOY / "k8s"
CHART = DEPLOY / "helm" / "infergate"
GPU_VALUES = CHART / "values-gpu.yaml"
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
"""The oldest version the chart supports (gRPC probes are GA since 1.27) and the newest bundled."""

MANIFEST_FILES = sorted(K8S.rglob("*.yaml"))


def validate(paths: list[Path]) -> None:
    for version in KUBERNETES_VERSIONS:
        result = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def plain_manifests() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def rendered(values: tuple[Path, ...] = ()) -> list[dict]:
    return Renderer(CHART, values).manifests()


def write(objects: list[dict], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False), encoding="utf-8")
    return path


def one(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def gateway_config(objects: list[dict], tmp_path: Path):
    text = one(objects, "ConfigMap")["data"]["infergate.yaml"]
    path = tmp_path / "infergate.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ={"INFERGATE_REDIS__URL": "redis://:pw@infergate-redis:6379/0"})


SETS = {
    "manifests": lambda: plain_manifests(),
    "chart": lambda: rendered(),
    "chart-gpu": lambda: rendered((GPU_VALUES,)),
}


# -- schema validation --------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_strictly(path):
    validate([path])


@pytest.mark.parametrize("values", [(), (GPU_VALUES,)], ids=["defaults", "gpu"])
def test_the_rendered_chart_validates_strictly(values, tmp_path):
    objects = rendered(values)
    assert objects
    validate([write(objects, tmp_path / "chart.yaml")])


def test_the_validator_rejects_an_unknown_field(tmp_path):
    """So that a passing validation means something."""
    deployment = one(plain_manifests(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"grpc": {"port": 8001}}
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(write([deployment], tmp_path / "bad.yaml"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "readinessprobe" in result.stdout


# -- what the objects must hold, for the plain manifests and the chart alike --------------------


@pytest.mark.parametrize("name", SETS)
def test_the_gateway_pod_has_grpc_probes_resources_and_a_restrictive_security_context(name, tmp_path):
    objects = SETS[name]()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 8001}, probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["models"]["readOnly"] is True and volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    assert "configMap" in volumes["config"] and "secret" in volumes["auth"]
    secret_env = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert [e["valueFrom"]["secretKeyRef"]["key"] for e in secret_env] == ["password"]

    config = gateway_config(objects, tmp_path)
    pause_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1].rsplit("(", 1)[1].rstrip(")"))
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_grace_s + pause_s
    assert config.auth.jwks_file == Path(mounts["auth"]["mountPath"]) / "jwks.json"
    assert config.redis.url.startswith("redis://")


@pytest.mark.parametrize("name", SETS)
def test_services_autoscaling_and_disruption(name):
    objects = SETS[name]()
    services = [o for o in objects if o["kind"] == "Service" and o["spec"]["selector"].get("app.kubernetes.io/component") == "gateway"]
    assert sorted(s["spec"].get("clusterIP", "") for s in services) == ["", "None"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    deployment = one(objects, "Deployment")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", SETS)
def test_the_network_policy_admits_callers_and_prometheus_and_lets_out_only_redis_triton_collector_dns(name):
    objects = SETS[name]()
    deployment = one(objects, "Deployment")
    policy = next(
        o for o in objects
        if o["kind"] == "NetworkPolicy" and o["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )  # fmt: skip
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress = {rule["ports"][0]["port"]: rule["from"] for rule in policy["spec"]["ingress"]}
    assert set(ingress) == {8001, 9091}
    assert ingress[8001][0]["podSelector"]["matchLabels"] == {"infergate-client": "true"}
    assert ingress[9091][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    egress_ports = sorted({port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]})
    assert egress_ports == [53, 4317, 6379, 8001]
    assert all(rule.get("to") for rule in policy["spec"]["egress"])


@pytest.mark.parametrize("name", SETS)
def test_redis_keeps_its_data_on_a_persistent_volume(name):
    objects = SETS[name]()
    redis = one(objects, "StatefulSet", "redis")
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in args
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert container["volumeMounts"] == [{"name": claim["metadata"]["name"], "mountPath": "/data"}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_gpu_values_ask_for_a_gpu_and_put_the_cuda_provider_first(tmp_path):
    objects = rendered((GPU_VALUES,))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["containers"][0]["image"].endswith(":0.1.0-gpu")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    config = gateway_config(objects, tmp_path)
    assert config.backends["onnx_gpu"].providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    variants = config.models["classifier"].variants
    assert list(variants) == ["v1", "v1_onnx"] and variants["v1"].fallback == "v1_onnx"


def test_the_queue_depth_hpa_follows_cpu_and_the_adapter_metric():
    hpa = one(load_all(K8S / "prometheus-adapter" / "hpa-queue-depth.yaml"), "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == one(plain_manifests(), "HorizontalPodAutoscaler")["metadata"]["name"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "infergate_queue_depth"
    rules = yaml.safe_load(one(load_all(K8S / "prometheus-adapter" / "adapter-rules.yaml"), "ConfigMap")["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == "infergate_queue_depth"
    chart_hpa = one(rendered(), "HorizontalPodAutoscaler")
    assert len(chart_hpa["spec"]["metrics"]) == 1  # queue depth is opt-in in the chart


def test_a_managed_redis_replaces_the_bundled_one(tmp_path):
    values = tmp_path / "managed.yaml"
    values.write_text("redis: {enabled: false, externalUrl: 'rediss://:$(REDIS_PASSWORD)@redis.example.com:6380/0'}\n")
    objects = rendered((values,))
    assert not [o for o in objects if o["metadata"]["name"].endswith("-redis")]
    env = {e["name"]: e.get("value") for e in one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["INFERGATE_REDIS__URL"] == "rediss://:$(REDIS_PASSWORD)@redis.example.com:6380/0"
    validate([write(objects, tmp_path / "chart.yaml")])
    values.write_text("redis: {enabled: false}\n")
    with pytest.raises(TemplateError) as err:
        rendered((values,))
    assert "redis.externalUrl is required" in str(err.value)


# -- the renderer itself ------------------------------------------------------------------------


def test_the_renderer_follows_go_template_trimming_scoping_and_pipelines(tmp_path):
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("name: demo\nversion: 1.0.0\nappVersion: '2'\n")
    (chart / "values.yaml").write_text("a: {b: 3, gone: x}\nlist: [x, y]\nempty: ''\n")
    (chart / "templates" / "_h.tpl").write_text('{{- define "n" -}}{{ .Chart.Name }}-{{ .Release.Name }}{{- end -}}')
    (chart / "templates" / "t.yaml").write_text(
        "k: {{ include \"n\" . | quote }}\n"
        "{{- with .Values.a }}\nb: {{ .b }}\n{{- end }}\n"
        "{{- range $i, $v := .Values.list }}\nl{{ $i }}: {{ $v }}\n{{- end }}\n"
        "d: {{ default \"fallback\" .Values.empty }}\n"
        "{{- if .Values.a.gone }}\ngone: yes\n{{- else }}\ngone: no\n{{- end }}\n"
    )
    override = tmp_path / "over.yaml"
    override.write_text("a: {gone: null}\n")
    assert Renderer(chart, (override,), release="rel").render()["t.yaml"] == (
        'k: "demo-rel"\nb: 3\nl0: x\nl1: y\nd: fallback\ngone: no\n'
    )


@pytest.mark.parametrize("source", ["{{ lookup \"v1\" \"Secret\" \"ns\" \"x\" }}", "{{ template \"x\" . }}", "{{ if .a }}"])
def test_the_renderer_refuses_what_it_does_not_implement(source, tmp_path):
    with pytest.raises(TemplateError):
        nodes, _ = parse(source)
        chart = tmp_path / "c"
        (chart / "templates").mkdir(parents=True, exist_ok=True)
        (chart / "Chart.yaml").write_text("name: c\nversion: 0.1.0\n")
        (chart / "values.yaml").write_text("{}\n")
        (chart / "templates" / "t.yaml").write_text(source)
        Renderer(chart).render()


def test_helm_agrees_where_it_is_installed(tmp_path):
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("no helm binary (none installs from PyPI or Debian); chart_render rendered the chart")
    subprocess.run([helm, "lint", "--strict", str(CHART)], check=True, timeout=120)
    for values in [(), (GPU_VALUES,)]:
        args = [a for v in values for a in ("-f", str(v))]
        out = subprocess.run([helm, "template", "infergate", str(CHART), *args], check=True, capture_output=True, text=True, timeout=120).stdout
        from_helm = [d for d in yaml.safe_load_all(out) if d]
        assert sorted((o["kind"], o["metadata"]["name"]) for o in from_helm) == sorted(
            (o["kind"], o["metadata"]["name"]) for o in rendered(values)
        )
        validate([write(from_helm, tmp_path / "helm.yaml")])
