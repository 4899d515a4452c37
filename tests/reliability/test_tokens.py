"""Token edge cases (issue 9, item 12), on the real verifier with real keys and a real JWKS file.

Classes of defect fixed in ``gateway/auth/verifier.py`` and ``keys.py``:
- a NumericDate that is not a finite number in range (NaN, Infinity, 1e400, 10**400) was accepted
  and never expired: now MALFORMED_TOKEN; JSON's NaN/Infinity constants are refused outright;
- header members of the wrong type (``alg`` or ``kid`` a list or an object) raised TypeError,
  answered INTERNAL with an ERROR line per call: now UNAUTHENTICATED;
- one JWKS entry with a member of the wrong type crashed start-up: now skipped with a warning,
  the other keys serve;
- scopes were split on any Unicode whitespace, so ``"infer:a\\u00a0admin:routes"`` granted two
  scopes: now split on ASCII space only (RFC 6749 3.3).
"""

from __future__ import annotations

import json
import logging

import grpc
import jwt
import pytest

from infergate.gateway.auth import Reason, TokenRejected, TokenVerifier, parse_jwks, scopes_of
from infergate.gateway.auth.keys import JwksFileSource
from infergate.gateway.config import AuthConfig
from tests.gateway.auth.conftest import auth_block, gateway_config
from tests.gateway.auth.issuer import Issuer, forge
from tests.reliability.conftest import gateway_running
from tests.router.fakes import FakeClock

pytestmark = pytest.mark.reliability

ALLOWED = frozenset({"RS256", "ES256", "EdDSA"})
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
async def verifier(issuer, tmp_path):
    path = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1", "ec-1")
    source = JwksFileSource(path, ALLOWED, poll_s=3600)
    await source.start()
    yield TokenVerifier(AuthConfig(**auth_block(jwks_file=path)), source, FakeClock(NOW))
    await source.close()


def signed(issuer: Issuer, payload_json: str, header: dict | None = None) -> str:
    """A correctly signed RS256 token whose payload is exactly ``payload_json`` (any JSON text)."""
    return jwt.api_jws.encode(payload_json.encode(), issuer.keys["rsa-1"], algorithm="RS256",
                              headers={"kid": "rsa-1", **(header or {})})


async def reason_of(verifier: TokenVerifier, token: str) -> Reason | None:
    try:
        await verifier.verify(token)
    except TokenRejected as exc:
        return exc.reason
    return None


def claims_json(issuer: Issuer, **raw_values: str) -> str:
    """Good claims as JSON text, with some values replaced by raw JSON text (``1e400``, ``NaN``)."""
    claims = issuer.claims(now=NOW)
    text = json.dumps({name: f"@{name}@" if name in raw_values else value for name, value in claims.items()})
    for name, raw in raw_values.items():
        text = text.replace(f'"@{name}@"', raw)
    if "nbf" in raw_values and '"@nbf@"' not in text and "nbf" not in claims:
        text = text[:-1] + f', "nbf": {raw_values["nbf"]}}}'
    return text


@pytest.mark.parametrize("claim", ["exp", "nbf"])
@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400, "1e300", "true", "\"9999999999\""])
async def test_a_time_claim_that_is_not_a_finite_date_is_refused(verifier, issuer, claim, raw):
    token = signed(issuer, claims_json(issuer, **{claim: raw}))
    assert await reason_of(verifier, token) == Reason.MALFORMED_TOKEN


async def test_a_good_token_still_passes(verifier, issuer):
    assert await reason_of(verifier, signed(issuer, claims_json(issuer))) is None


@pytest.mark.parametrize("member", ["alg", "kid"])
@pytest.mark.parametrize("value", [["RS256"], {"a": 1}, 5, None])
async def test_header_members_of_the_wrong_type_are_unauthenticated(verifier, issuer, member, value):
    header = {"alg": "RS256", "kid": "rsa-1", member: value}
    if value is None:
        header.pop(member)
        if member == "kid":
            return  # a token without kid is legal (one key per algorithm)
    token = forge(header, issuer.claims(now=NOW), b"x" * 256)
    reason = await reason_of(verifier, token)
    assert reason in (Reason.ALGORITHM, Reason.MALFORMED_TOKEN), reason


def test_a_malformed_jwks_entry_is_skipped_with_a_warning(issuer, caplog):
    bad_entries = [
        {**issuer.jwk("ec-1"), "kid": "bad-crv", "crv": ["P-256"]},
        {**issuer.jwk("ec-1"), "kid": "bad-alg", "alg": ["ES256"]},
        {**issuer.jwk("rsa-2"), "kid": "bad-n", "n": ["x"]},
        {**issuer.jwk("rsa-2"), "kid": "bad-e", "e": {"v": 1}},
        {**issuer.jwk("rsa-2"), "kid": "bad-kty", "kty": ["RSA"]},
        ["not", "an", "object"],
    ]
    document = json.dumps({"keys": [*bad_entries, issuer.jwk("rsa-1")]}).encode()
    with caplog.at_level(logging.WARNING, logger="infergate.gateway.auth.keys"):
        keys = parse_jwks(document, ALLOWED)
    assert [key.kid for key in keys.keys] == ["rsa-1"]
    warned = caplog.text
    for kid in ("bad-crv", "bad-alg", "bad-n", "bad-e", "bad-kty"):
        assert kid in warned


@pytest.mark.parametrize("separator", ["\u00a0", "\x1f", "\u2028", "\t", "\n", "\u3000"])
def test_scopes_split_on_ascii_space_only(separator):
    scopes = scopes_of({"scope": f"infer:linear{separator}admin:routes  infer:ab"})
    assert "admin:routes" not in scopes
    assert scopes == {f"infer:linear{separator}admin:routes", "infer:ab"}


def test_a_list_alg_over_the_wire_is_unauthenticated_without_an_error_line(issuer, model_paths, tmp_path):
    jwks = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1")
    config = gateway_config(model_paths, jwks_file=str(jwks))
    from infergate.gateway._proto.inference import grpc_service_pb2 as pb
    from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub

    tokens = [
        forge({"alg": ["RS256"], "kid": "rsa-1"}, issuer.claims()),
        forge({"alg": {"RS256": 1}, "kid": "rsa-1"}, issuer.claims()),
        forge({"alg": "RS256", "kid": ["rsa-1"]}, issuer.claims()),
        signed(issuer, claims_json(issuer, exp="NaN")),
    ]
    with gateway_running(config, tmp_path, "token-gateway", debug=True) as gateway:
        with grpc.insecure_channel(gateway.url) as channel:
            stub = GRPCInferenceServiceStub(channel)
            for token in tokens:
                with pytest.raises(grpc.RpcError) as err:
                    stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        log_text = gateway.output
    assert " ERROR " not in log_text
    assert "Traceback" not in log_text
