"""Log lines an SRE can query: JSON with trace ids, the access log, admin changes, the start-up line."""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.gateway._proto.infergate.admin.v1 import admin_pb2, admin_pb2_grpc
from infergate.gateway.auth.logfilter import SubjectLogFilter
from infergate.gateway.logs import ACCESS_LOGGER, JsonFormatter
from tests.conftest import running_gateway
from tests.gateway.test_tracing import PARENT_SPAN_ID, TRACE_ID, otlp_receiver  # noqa: F401 (fixture)
from tests.support.processes import GatewayProcess

SECRET = "Bearer eyJhbGciOiJub25lIn0.secret-token-value"


class JsonLines(logging.Handler):
    """The gateway's JSON format, kept in memory: one parsed object per line."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.addFilter(SubjectLogFilter())
        self.lines: list[dict] = []
        self.raw: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.raw.append(line)
        self.lines.append(json.loads(line))


@pytest.fixture
def json_lines():
    handler = JsonLines()
    root = logging.getLogger("infergate")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def tensor(rows: int, dtype: str = "FP32") -> InferInput:
    value = InferInput("INPUT", [rows, 16], dtype)
    value.set_data_from_numpy(np.ones((rows, 16), np.float32 if dtype == "FP32" else np.float64))
    return value


async def test_access_lines_carry_the_callers_trace_and_never_a_token(onnx_gateway_config, otlp_receiver, json_lines):  # noqa: F811
    receiver, port = otlp_receiver
    config = dict(onnx_gateway_config, telemetry={"otlp_endpoint": f"http://127.0.0.1:{port}"},
                  logging={"format": "json", "access_log_sample_ratio": 1.0})
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01", "authorization": SECRET}
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            await client.infer("linear", [tensor(2)], headers=headers, request_id="call-1")
            with pytest.raises(InferenceServerException):
                await client.infer("linear", [tensor(1, "FP64")], headers=headers, request_id="call-2")
        finally:
            await client.close()
    access = [line for line in json_lines.lines if line["logger"] == ACCESS_LOGGER]
    assert [line["status"] for line in access] == ["OK", "INVALID_ARGUMENT"]
    ok, refused = access
    assert refused["refused"] is True and refused["request_id"] == "call-2" and "duration_ms" not in refused
    assert (ok["level"], ok["model"], ok["variant"], ok["status"], ok["request_id"]) == ("INFO", "linear", "v1", "OK", "call-1")
    assert ok["duration_ms"] > 0 and ok["tenant"] == "anonymous"
    assert ok["trace_id"] == TRACE_ID
    server_spans = {span.span_id.hex() for _, span in receiver.spans if span.name == "infergate/ModelInfer"}
    assert ok["span_id"] in server_spans  # the line points at the gateway's own span of that call
    assert not any("secret-token-value" in line or "Bearer" in line for line in json_lines.raw)


def call_record(endpoint, code: str, request_id: str):
    from infergate.gateway.identity import Identity
    from infergate.gateway.pipeline import CallContext, CallRecord, InferResult

    identity = Identity("svc-checkout", frozenset({"infer:*"}), tenant="shop-7")
    context = CallContext({"authorization": SECRET}, {}, 0.0, identity, request_id=request_id)
    result = InferResult({}, "v1") if code == "OK" else None
    return CallRecord(endpoint, "v1", code, 0.0042, {}, (), result, context)


async def test_access_log_logs_every_failed_call_up_to_a_rate_and_samples_the_rest(onnx_gateway_config, json_lines):
    from infergate.gateway.logs import AccessLog
    from tests.router.fakes import FakeClock

    clock = FakeClock(now=50.0)
    async with running_gateway(onnx_gateway_config) as gateway:
        endpoint = gateway.pipeline.endpoint("linear")
    access = AccessLog(sample_ratio=0.0, clock=clock, errors_per_s=3)
    for index in range(5):
        access.observe(call_record(endpoint, "UNAVAILABLE", f"failed-{index}"))
    access.observe(call_record(endpoint, "OK", "ok-0"))  # ratio 0: successes are not logged
    clock.now = 51.0
    access.observe(call_record(endpoint, "DEADLINE_EXCEEDED", "late"))
    lines = [line for line in json_lines.lines if line["logger"] == ACCESS_LOGGER]
    assert [line.get("request_id") for line in lines] == ["failed-0", "failed-1", "failed-2", None, "late"]
    assert lines[3]["suppressed"] == 2 and "left out" in lines[3]["message"]
    first = lines[0]
    assert (first["level"], first["model"], first["variant"], first["status"], first["tenant"]) == (
        "WARNING", "linear", "v1", "UNAVAILABLE", "shop-7")
    assert first["duration_ms"] == 4.2
    assert not any("secret-token-value" in line for line in json_lines.raw)


async def test_one_line_per_admin_change(onnx_gateway_config, redis_url, json_lines):
    config = dict(onnx_gateway_config, redis={"url": redis_url})
    async with running_gateway(config) as gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = admin_pb2_grpc.RoutingAdminStub(channel)
            await stub.SetWeights(admin_pb2.SetWeightsRequest(model="ab", weights={"v1": 90, "v2": 10}, reason="ramp"))
            await stub.Rollback(admin_pb2.RollbackRequest(model="ab", reason="bad"))
    changes = [line for line in json_lines.lines if line.get("action")]
    assert [(c["action"], c["model"], c["weights"], c["reason"]) for c in changes] == [
        ("set_weights", "ab", {"v1": 90, "v2": 10}, "ramp"),
        ("rollback", "ab", {"v1": 100, "v2": 0}, "bad"),
    ]
    assert changes[1]["revision"] == changes[0]["revision"] + 1


def test_start_up_line_states_models_ports_and_workers_in_json(onnx_gateway_config, tmp_path):
    config = dict(onnx_gateway_config, logging={"format": "json"})
    gateway = GatewayProcess(config, tmp_path, name="json-logs").start()
    try:
        assert gateway.stop() == 0
    finally:
        gateway.kill()
    lines = [json.loads(line) for line in gateway.output.splitlines() if line.startswith("{")]
    started = [line for line in lines if "serving" in line["message"]]
    assert len(started) == 1, gateway.output
    line = started[0]
    assert line["port"] == gateway.port and line["metrics_port"] == gateway.metrics_port
    assert line["workers"] == 1
    assert line["backends"] == {"onnx_cpu": "onnx"}
    assert line["models"]["ab"] == {"v1": "onnx_cpu:linear_v1.onnx", "v2": "onnx_cpu:linear_v2.onnx"}
    assert line["level"] == "INFO" and line["version"]
    # every log line is JSON (only the plain "listening on port" line for process managers is not)
    others = [text for text in gateway.output.splitlines() if text and not text.startswith("{")]
    assert all(text.startswith("infergate listening on port") for text in others), others


# -- calls refused before routing ----------------------------------------------------------------

def requests_total(model: str, variant: str, code: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("infergate_requests_total", {"model": model, "variant": variant, "code": code}) or 0.0


async def test_calls_refused_before_routing_are_counted_and_logged_without_a_token(onnx_gateway_config, json_lines, tmp_path):
    from tests.gateway.auth.conftest import auth_block
    from tests.gateway.auth.issuer import Issuer

    issuer = Issuer()
    jwks = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1")
    config = dict(onnx_gateway_config, auth=auth_block(jwks_file=str(jwks)), logging={"format": "json"})
    everything = issuer.token(scope="infer:*", sub="svc-checkout")
    linear_only = issuer.token(scope="infer:linear", sub="svc-search")
    bad_token = "eyJhbGciOiJub25lIn0.refused-token-value."
    expected = {  # (model label, variant label, code) -> calls; a made-up model name is never a label
        ("", "", "UNAUTHENTICATED"): 2,
        ("ab", "", "PERMISSION_DENIED"): 1,
        ("", "", "NOT_FOUND"): 1,
        ("linear", "", "INVALID_ARGUMENT"): 2,
        ("linear", "v1", "OK"): 1,
    }
    before = {key: requests_total(*key) for key in expected}
    calls = [  # model, inputs, token, extra headers, request id, status the caller gets
        ("linear", [tensor(1)], None, {}, "no-token", "UNAUTHENTICATED"),
        ("linear", [tensor(1)], bad_token, {}, "bad-token", "UNAUTHENTICATED"),
        ("ab", [tensor(1)], linear_only, {}, "no-scope", "PERMISSION_DENIED"),
        ("no_such_model", [tensor(1)], everything, {}, "unknown-model", "NOT_FOUND"),
        ("linear", [tensor(1, "FP64")], everything, {}, "bad-tensor", "INVALID_ARGUMENT"),
        ("linear", [tensor(1)], everything, {"x-infergate-variant": "v9"}, "bad-pin", "INVALID_ARGUMENT"),
    ]
    statuses = []
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            for model, inputs, token, headers, request_id, _ in calls:
                if token is not None:
                    headers = {**headers, "authorization": f"Bearer {token}"}
                with pytest.raises(InferenceServerException) as refused:
                    await client.infer(model, inputs, headers=headers, request_id=request_id)
                statuses.append(refused.value.status())
            await client.infer("linear", [tensor(1)], headers={"authorization": f"Bearer {everything}"}, request_id="ok")
        finally:
            await client.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:  # not an inference call
            with pytest.raises(grpc.aio.AioRpcError) as admin:
                await admin_pb2_grpc.RoutingAdminStub(channel).ListRoutes(admin_pb2.ListRoutesRequest())
    assert admin.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [status.removeprefix("StatusCode.") for status in statuses] == [call[-1] for call in calls]
    assert {key: requests_total(*key) - before[key] for key in expected} == expected
    refused_lines = [line for line in json_lines.lines if line["logger"] == ACCESS_LOGGER and line.get("refused")]
    assert [(line["status"], line["request_id"]) for line in refused_lines] == [
        ("UNAUTHENTICATED", ""), ("UNAUTHENTICATED", ""),  # refused before the request was read
        ("PERMISSION_DENIED", "no-scope"), ("NOT_FOUND", "unknown-model"),
        ("INVALID_ARGUMENT", "bad-tensor"), ("INVALID_ARGUMENT", "bad-pin"),
    ]
    by_id = {line["request_id"]: line for line in refused_lines}
    assert (by_id["no-scope"]["model"], by_id["no-scope"]["tenant"], by_id["no-scope"]["variant"]) == ("ab", "svc-search", "")
    assert by_id["unknown-model"]["model"] == "no_such_model"  # the name asked for is in the line, not in a label
    assert all(line["level"] == "WARNING" and "duration_ms" not in line for line in refused_lines)
    assert not any(secret in line for line in json_lines.raw for secret in (bad_token, everything, linear_only, "Bearer"))


async def test_a_refused_call_is_counted_but_not_logged_with_failed_call_lines_off(onnx_gateway_config, json_lines):
    config = dict(onnx_gateway_config, logging={"format": "json", "access_log_sample_ratio": 1.0, "log_failed_calls": False})
    before = requests_total("linear", "", "INVALID_ARGUMENT")
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            with pytest.raises(InferenceServerException):
                await client.infer("linear", [tensor(1, "FP64")], request_id="quiet")
            await client.infer("linear", [tensor(1)], request_id="sampled")
        finally:
            await client.close()
    assert requests_total("linear", "", "INVALID_ARGUMENT") - before == 1
    access = [line for line in json_lines.lines if line["logger"] == ACCESS_LOGGER]
    assert [line["request_id"] for line in access] == ["sampled"]  # successes sampled, failures not logged


async def test_calls_refused_at_the_decoding_edge_are_counted_and_logged(onnx_gateway_config, json_lines):
    """A ModelInfer message that does not parse, and one over the in-flight memory budget."""
    server = dict(onnx_gateway_config.get("server", {}), max_inflight_request_bytes=4096)
    config = dict(onnx_gateway_config, server=server, logging={"format": "json"})
    before = {code: requests_total("", "", code) for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")}
    async with running_gateway(config) as gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
            with pytest.raises(grpc.aio.AioRpcError) as malformed:
                await infer(b"\x0a\xff\xff\xff\xff\x0f")  # field 1 with a length far past the end
            with pytest.raises(grpc.aio.AioRpcError) as too_big:
                await infer(b"\x0a\x06linear" + b"\x12\x01x" * 3000)  # 9 KB of a valid message
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert {code: requests_total("", "", code) - before[code] for code in before} == {
        "INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1,
    }
    refused = [line for line in json_lines.lines if line["logger"] == ACCESS_LOGGER and line.get("refused")]
    assert [(line["status"], line["model"]) for line in refused] == [("INVALID_ARGUMENT", ""), ("RESOURCE_EXHAUSTED", "")]
