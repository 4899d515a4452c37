"""No secret in any log line (issue 9, item 11).

The Redis URL was logged with its password when Redis was unreachable at start. Class of defect:
secrets reach logs through our own lines and through library exception text. Fixed in two layers
(``gateway/redaction.py``): URLs are logged through ``redact_url``, and the CLI's log handler
formats through ``RedactingFormatter``, which masks URL passwords, bearer tokens, JWTs and the
HS256 secret in every line, tracebacks included.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from infergate.gateway.redaction import RedactingFormatter, add_secret, redact_url
from tests.gateway.auth.conftest import gateway_config
from tests.gateway.auth.issuer import Issuer, forge_hs256
from tests.reliability.conftest import gateway_running
from tests.support.processes import free_port

pytestmark = pytest.mark.reliability

REDIS_PASSWORD = "redis-pass-Zq81x"
OTLP_PASSWORD = "otlp-pass-Kk22"
HS256_SECRET = "hs256-secret-" + "w" * 40


def test_a_gateway_whose_redis_is_down_logs_no_secret(model_paths, tmp_path):
    issuer = Issuer()
    config = gateway_config(model_paths, hs256_secret_env="INFERGATE_RELIABILITY_SECRET", algorithms=["HS256"])
    config["redis"] = {"url": f"redis://default:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"}
    config["telemetry"] = {"otlp_endpoint": f"http://user:{OTLP_PASSWORD}@127.0.0.1:{free_port()}"}
    good = forge_hs256({"alg": "HS256", "typ": "JWT"}, issuer.claims(), HS256_SECRET.encode())
    forged = forge_hs256({"alg": "HS256", "typ": "JWT"}, issuer.claims(), b"wrong-secret-" + b"x" * 40)
    with gateway_running(config, tmp_path, "secrets-gateway", debug=True,
                         extra_env={"INFERGATE_RELIABILITY_SECRET": HS256_SECRET}) as gateway:
        with grpc.insecure_channel(gateway.url) as channel:
            stub = GRPCInferenceServiceStub(channel)
            assert stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {good}")], timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {forged}")], timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        log_text = gateway.output
    assert "route store at redis://default:***@127.0.0.1" in log_text  # the line that leaked it is still there
    for secret in (REDIS_PASSWORD, OTLP_PASSWORD, HS256_SECRET, good, forged, good.rsplit(".", 1)[1], forged.rsplit(".", 1)[1]):
        assert secret not in log_text


def test_the_log_formatter_masks_secrets_inside_library_exceptions():
    add_secret("configured-secret-value")
    formatter = RedactingFormatter("%(message)s")
    try:
        raise ConnectionError("Error connecting to redis://:pw-in-url@10.0.0.1:6379/0?password=pw-in-query "
                              "with authorization Bearer abc.def.ghi, secret configured-secret-value")
    except ConnectionError as exc:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed for %s", ("eyJhbGciOi.eyJzdWIi.c2ln",), (type(exc), exc, exc.__traceback__))
    line = formatter.format(record)
    for secret in ("pw-in-url", "pw-in-query", "abc.def.ghi", "configured-secret-value", "eyJhbGciOi.eyJzdWIi.c2ln"):
        assert secret not in line
    assert "Traceback" in line and "redis://:***@10.0.0.1:6379/0" in line


@pytest.mark.parametrize("url,expected", [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://user:pw@host/1", "rediss://user:***@host/1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("unix:///run/redis.sock?password=pw&db=0", "unix:///run/redis.sock?password=***&db=0"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected
