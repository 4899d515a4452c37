"""Auth end to end: ``infergate serve`` processes called with unmodified tritonclient.

One gateway per key source (JWKS file, JWKS URL, HS256 secret with per-tenant rate limits), each
logging at DEBUG; after its tests, no token signature and no secret may appear in its log.
"""

from __future__ import annotations

import time

import grpc
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.gateway.auth.conftest import CALL_TIMEOUT_S, bearer, gateway_config, infer, start_gateway, status_of
from tests.gateway.auth.issuer import forge, forge_hs256, signature_of
from tests.gateway.auth.jwks_server import JwksServer
from tests.support.processes import wait_until

HS256_SECRET = "e2e-secret-" + "k" * 40
RATE_LIMIT_BURST = 3


def assert_clean_log(log_text: str, tokens: list[str], secrets: tuple[str, ...] = ()) -> None:
    assert "Traceback" not in log_text
    for token in tokens:
        assert token not in log_text
        signature = signature_of(token)
        if len(signature) >= 16:
            assert signature not in log_text
    for secret in secrets:
        assert secret not in log_text


# -- a gateway whose keys come from a JWKS file ---------------------------------------------------


@pytest.fixture(scope="module")
def file_gateway(issuer, model_paths, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("auth-file")
    jwks = issuer.write_jwks(workdir / "jwks.json", "rsa-1", "ec-1", "ed-1")
    config = gateway_config(model_paths, jwks_file=str(jwks), jwks_file_poll_s=0.2)
    process = start_gateway(config, workdir, "file-gateway")
    yield process
    process.stop()
    assert not process.alive()


@pytest.fixture(scope="module")
def client(file_gateway):
    client = grpcclient.InferenceServerClient(file_gateway.url)
    yield client
    client.close()


def bad_tokens(issuer) -> dict[str, str | None]:
    now = time.time()
    good = issuer.token()
    header, payload, _signature = good.split(".")
    claims = issuer.claims()
    return {
        "no token": None,
        "garbage": "garbage",
        "two segments": f"{header}.{payload}",
        "alg none": forge({"alg": "none", "typ": "JWT"}, claims),
        "stripped signature": f"{header}.{payload}.",
        "HS256 signed with the RSA public key": forge_hs256(
            {"alg": "HS256", "kid": "rsa-1"}, claims, issuer.public_pem("rsa-1")
        ),
        "key not in the JWKS": issuer.token("rogue", key=issuer.rogue),
        "expired beyond leeway": issuer.token(exp=int(now) - 120),
        "nbf in the future": issuer.token(nbf=int(now) + 300),
        "wrong issuer": issuer.token(iss="https://evil.example"),
        "wrong audience": issuer.token(aud="not-infergate"),
        "missing exp": issuer.token(exp=None),
        "path-like kid": issuer.token(headers={"kid": "../../../../etc/passwd"}),
        "Basic instead of Bearer": None,
    }


@pytest.mark.parametrize(
    "case",
    [
        "no token", "garbage", "two segments", "alg none", "stripped signature",
        "HS256 signed with the RSA public key", "key not in the JWKS", "expired beyond leeway",
        "nbf in the future", "wrong issuer", "wrong audience", "missing exp", "path-like kid",
        "Basic instead of Bearer",
    ],
)
def test_bad_token_is_unauthenticated_and_the_next_good_call_works(client, issuer, case):
    token = bad_tokens(issuer)[case]
    basic = {"authorization": "Basic YWxpY2U6c2VjcmV0"} if case == "Basic instead of Bearer" else None
    with pytest.raises(InferenceServerException) as err:
        infer(client, token, headers=basic)
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    if token:
        issuer.keep(token)
        for part in token.split("."):
            assert len(part) < 8 or part not in str(err.value)
    assert infer(client, issuer.token()).as_numpy("PROBS").shape == (1, 4)


def test_expired_within_leeway_is_accepted(client, issuer):
    token = issuer.token(exp=int(time.time()) - 10)  # leeway_s is 30
    assert infer(client, token).as_numpy("PROBS").shape == (1, 4)


@pytest.mark.parametrize("kid", ["ec-1", "ed-1"])
def test_es256_and_eddsa_tokens(client, issuer, kid):
    assert status_of(infer, client, issuer.token(kid)) == "OK"


def test_scope_matrix(client, issuer):
    tokens = {
        "model scope": issuer.token(scope="infer:linear"),
        "wildcard": issuer.token(scope="infer:*"),
        "admin only": issuer.token(scope="admin:routes"),
        "scp list": issuer.token(scope=None, scp=["infer:ab"]),
        "permissions list": issuer.token(scope=None, permissions=["infer:linear", "infer:ab"]),
    }
    expected = {
        # caller: (linear, ab, an unknown model)
        "model scope": ("OK", "PERMISSION_DENIED", "PERMISSION_DENIED"),
        "wildcard": ("OK", "OK", "NOT_FOUND"),
        "admin only": ("PERMISSION_DENIED", "PERMISSION_DENIED", "PERMISSION_DENIED"),
        "scp list": ("PERMISSION_DENIED", "OK", "PERMISSION_DENIED"),
        "permissions list": ("OK", "OK", "PERMISSION_DENIED"),
    }
    seen = {
        caller: tuple(status_of(infer, client, token, model) for model in ("linear", "ab", "no-such-model"))
        for caller, token in tokens.items()
    }
    assert seen == expected


def test_metadata_and_listings_follow_the_scopes(client, issuer):
    linear_only = bearer(issuer.token(scope="infer:linear"))
    assert client.get_model_metadata("linear", headers=linear_only).name == "linear"
    assert status_of(client.get_model_metadata, "ab", headers=linear_only) == "PERMISSION_DENIED"
    assert status_of(client.get_model_config, "no-such-model", headers=linear_only) == "PERMISSION_DENIED"
    assert status_of(client.is_model_ready, "ab", headers=linear_only) == "PERMISSION_DENIED"
    index = client.get_model_repository_index(headers=linear_only)
    assert [model.name for model in index.models] == ["linear"]
    stats = client.get_inference_statistics(headers=linear_only)
    assert [model.name for model in stats.model_stats] == ["linear"]


def test_variant_pin_needs_the_model_scope(client, issuer):
    pin = {"x-infergate-variant": "v2"}
    assert status_of(infer, client, issuer.token(scope="infer:linear"), "ab", headers=pin) == "PERMISSION_DENIED"
    assert status_of(infer, client, issuer.token(scope="infer:ab"), "ab", headers=pin) == "OK"


def test_health_needs_no_token_but_triton_liveness_does(file_gateway, client, issuer):
    with grpc.insecure_channel(file_gateway.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        model = stub.Check(health_pb2.HealthCheckRequest(service="linear"), timeout=CALL_TIMEOUT_S)
    assert overall.status == model.status == health_pb2.HealthCheckResponse.SERVING
    assert status_of(client.is_server_live) == "UNAUTHENTICATED"
    assert client.is_server_live(headers=bearer(issuer.token(scope="admin:routes")))


def test_file_gateway_log_is_clean(file_gateway, issuer):
    log_text = file_gateway.log_path.read_text()
    assert "subject alice" in log_text  # DEBUG lines name the subject...
    assert_clean_log(log_text, issuer.minted)  # ...and never the token


# -- JWKS file rotation (its own gateway: the test rewrites the file) -----------------------------


def test_jwks_file_rotation(gateway_process, issuer, model_paths, tmp_path):
    jwks = issuer.write_jwks(tmp_path / "rotating.json", "rsa-1")
    config = gateway_config(model_paths, jwks_file=str(jwks), jwks_file_poll_s=0.1)
    process = gateway_process(config, "rotation")
    client = grpcclient.InferenceServerClient(process.url)
    try:
        old, new = issuer.token("rsa-1"), issuer.token("rsa-2")
        assert status_of(infer, client, old) == "OK"
        assert status_of(infer, client, new) == "UNAUTHENTICATED"

        issuer.write_jwks(jwks, "rsa-1", "rsa-2")  # a key added is accepted at once (unknown kid: look again)
        assert status_of(infer, client, new) == "OK"

        issuer.write_jwks(jwks, "rsa-2")  # a key removed is rejected, even for a token verified before
        wait_until(lambda: status_of(infer, client, old) == "UNAUTHENTICATED", 20, 0.1, "old key refused")
        assert status_of(infer, client, issuer.token("rsa-1")) == "UNAUTHENTICATED"
        assert status_of(infer, client, new) == "OK"
    finally:
        client.close()
    assert_clean_log(process.log_path.read_text(), issuer.minted)


# -- keys from a JWKS URL -------------------------------------------------------------------------


def test_jwks_url_down_with_a_warm_cache_and_unknown_kid_floods(issuer, model_paths, tmp_path):
    server = JwksServer(issuer.jwks("rsa-1", "ec-1")).start()
    config = gateway_config(model_paths, jwks_url=server.url, jwks_cache_ttl_s=3600, jwks_refresh_cooldown_s=60)
    process = start_gateway(config, tmp_path, "url-gateway")
    client = grpcclient.InferenceServerClient(process.url)
    try:
        assert server.requests == 1  # fetched once at start
        token = issuer.token("rsa-1")
        assert status_of(infer, client, token) == "OK"

        flood = [issuer.token(f"unknown-{i}", key=issuer.rogue) for i in range(40)]
        assert {status_of(infer, client, stranger) for stranger in flood} == {"UNAUTHENTICATED"}
        assert server.requests <= 2  # at most one fetch per cooldown, however many unknown kids

        server.stop()
        assert status_of(infer, client, token) == "OK"  # the verified-token cache
        assert status_of(infer, client, issuer.token("ec-1")) == "OK"  # the cached keys
        assert status_of(infer, client, issuer.token("rsa-2")) == "UNAUTHENTICATED"
    finally:
        client.close()
        server.stop()
        process.stop()
    assert not process.alive()
    assert_clean_log(process.log_path.read_text(), issuer.minted)


# -- HS256 with a secret from the environment, and per-tenant rate limits ------------------------


@pytest.fixture(scope="module")
def hs256_gateway(model_paths, tmp_path_factory):
    config = gateway_config(
        model_paths,
        algorithms=["HS256"],
        hs256_secret_env="INFERGATE_TEST_JWT_SECRET",
        tenant_claim="tenant",
        rate_limit_per_tenant_rps=0.01,  # a token back every 100 s: nothing refills during the test
        rate_limit_burst=RATE_LIMIT_BURST,
    )
    workdir = tmp_path_factory.mktemp("auth-hs256")
    process = start_gateway(config, workdir, "hs256-gateway", extra_env={"INFERGATE_TEST_JWT_SECRET": HS256_SECRET})
    yield process
    process.stop()
    assert not process.alive()


def hs256_token(issuer, secret: str = HS256_SECRET, **claims) -> str:
    return issuer.keep(forge_hs256({"alg": "HS256", "typ": "JWT"}, issuer.claims(**claims), secret.encode()))


def test_hs256_secret_and_key_confusion(hs256_gateway, issuer):
    client = grpcclient.InferenceServerClient(hs256_gateway.url)
    try:
        assert status_of(infer, client, hs256_token(issuer, tenant="hs-good")) == "OK"
        assert status_of(infer, client, hs256_token(issuer, "x" * 48, tenant="hs-bad")) == "UNAUTHENTICATED"
        assert status_of(infer, client, issuer.token("rsa-1", tenant="hs-rsa")) == "UNAUTHENTICATED"
    finally:
        client.close()


def test_tenant_over_its_rate_is_refused_while_another_is_served(hs256_gateway, issuer):
    client = grpcclient.InferenceServerClient(hs256_gateway.url)
    try:
        tenant_a = [hs256_token(issuer, sub=f"a-{i}", tenant="tenant-a") for i in range(RATE_LIMIT_BURST + 2)]
        tenant_b = hs256_token(issuer, sub="b", tenant="tenant-b")
        a_codes = [status_of(infer, client, token) for token in tenant_a]
        b_code = status_of(infer, client, tenant_b)
        with pytest.raises(InferenceServerException) as err:
            infer(client, tenant_a[0])
    finally:
        client.close()
    assert a_codes == ["OK"] * RATE_LIMIT_BURST + ["RESOURCE_EXHAUSTED"] * 2
    assert b_code == "OK"
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "tenant over its request rate" in err.value.message()


def test_hs256_gateway_log_is_clean(hs256_gateway, issuer):
    assert_clean_log(hs256_gateway.log_path.read_text(), issuer.minted, secrets=(HS256_SECRET,))
