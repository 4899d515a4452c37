"""The token verifier on its own: real keys, real pyjwt tokens, a real JWKS file and a real HTTP
JWKS server; time comes from a clock the test moves, never from sleeping."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from infergate.gateway.auth import AuthSetupError, Reason, TokenRejected, TokenVerifier, bearer_token, identity_from_claims, parse_jwks, scopes_of
from infergate.gateway.auth.keys import JwksFileSource, JwksUrlSource, SecretKeySource
from infergate.gateway.auth.ratelimit import TenantRateLimiter
from infergate.gateway.config import AuthConfig, ConfigError, parse_config
from tests.gateway.auth.conftest import auth_block
from tests.gateway.auth.issuer import AUDIENCE, forge, forge_hs256, signature_of
from tests.gateway.auth.jwks_server import JwksServer
from tests.router.fakes import FakeClock

ALLOWED = frozenset({"RS256", "ES256", "EdDSA"})
SECRET = "s" * 40


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)  # wall-clock seconds, as in exp and nbf


@dataclass
class FileRig:
    verifier: TokenVerifier
    source: JwksFileSource
    path: Path


@dataclass
class UrlRig:
    verifier: TokenVerifier
    source: JwksUrlSource
    server: JwksServer


@pytest.fixture
async def file_rig(issuer, tmp_path, clock):
    """A verifier over a JWKS file holding rsa-1, ec-1 and ed-1 (polled only when the test says)."""
    path = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1", "ec-1", "ed-1")
    source = JwksFileSource(path, ALLOWED, poll_s=3600)
    await source.start()
    yield FileRig(TokenVerifier(AuthConfig(**auth_block(jwks_file=path)), source, clock), source, path)
    await source.close()


@pytest.fixture
def file_verifier(file_rig) -> TokenVerifier:
    return file_rig.verifier


async def rejection(verifier: TokenVerifier, token: str) -> Reason | None:
    try:
        await verifier.verify(token)
    except TokenRejected as exc:
        return exc.reason
    return None


# -- what is accepted ---------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
async def test_each_asymmetric_algorithm_verifies(file_verifier, issuer, clock, kid):
    token = issuer.token(kid, now=clock(), sub=f"svc-{kid}", scope="infer:linear admin:routes")
    identity = await file_verifier.verify(token)
    assert identity.subject == f"svc-{kid}"
    assert identity.scopes == {"infer:linear", "admin:routes"}
    assert identity.authenticated


async def test_audience_may_be_a_list_holding_ours(file_verifier, issuer, clock):
    assert await rejection(file_verifier, issuer.token(now=clock(), aud=["other", AUDIENCE])) is None
    assert await rejection(file_verifier, issuer.token(now=clock(), aud=["other", "another"])) is Reason.AUDIENCE


async def test_leeway_applies_to_exp_and_nbf(file_verifier, issuer, clock):
    now = clock()
    assert await rejection(file_verifier, issuer.token(now=now, exp=int(now) - 10)) is None
    assert await rejection(file_verifier, issuer.token(now=now, exp=int(now) - 31)) is Reason.EXPIRED
    assert await rejection(file_verifier, issuer.token(now=now, nbf=int(now) + 20)) is None
    assert await rejection(file_verifier, issuer.token(now=now, nbf=int(now) + 40)) is Reason.NOT_YET_VALID


# -- what is refused ----------------------------------------------------------------------------


def bad_tokens(issuer, now: float) -> dict[str, tuple[str, Reason]]:
    claims = issuer.claims(now)
    good = issuer.token(now=now)
    header, payload, _signature = good.split(".")
    return {
        "garbage": ("not-a-jwt", Reason.MALFORMED_TOKEN),
        "two segments": (f"{header}.{payload}", Reason.MALFORMED_TOKEN),
        "four segments": (f"{good}.abc", Reason.MALFORMED_TOKEN),
        "bad base64 header": (f"!!!.{payload}.abc", Reason.MALFORMED_TOKEN),
        "alg none": (forge({"alg": "none", "typ": "JWT"}, claims), Reason.ALGORITHM),
        "alg None spelled differently": (forge({"alg": "None", "kid": "rsa-1"}, claims), Reason.ALGORITHM),
        "stripped signature": (f"{header}.{payload}.", Reason.BAD_SIGNATURE),
        "HS256 signed with the RSA public key": (
            forge_hs256({"alg": "HS256", "kid": "rsa-1"}, claims, issuer.public_pem("rsa-1")),
            Reason.ALGORITHM,
        ),
        "RS384 not configured": (forge({"alg": "RS384", "kid": "rsa-1"}, claims, b"x" * 256), Reason.ALGORITHM),
        "key not in the JWKS": (issuer.token("rogue", key=issuer.rogue, now=now), Reason.UNKNOWN_KEY),
        "another key under a known kid": (issuer.token("rsa-1", key=issuer.rogue, now=now), Reason.BAD_SIGNATURE),
        "ES256 kid with an RS256 header": (forge({"alg": "RS256", "kid": "ec-1"}, claims, b"x" * 256), Reason.UNKNOWN_KEY),
        "expired beyond leeway": (issuer.token(now=now, exp=int(now) - 120), Reason.EXPIRED),
        "nbf in the future": (issuer.token(now=now, nbf=int(now) + 300), Reason.NOT_YET_VALID),
        "wrong issuer": (issuer.token(now=now, iss="https://evil.example"), Reason.ISSUER),
        "no issuer": (issuer.token(now=now, iss=None), Reason.ISSUER),
        "wrong audience": (issuer.token(now=now, aud="someone-else"), Reason.AUDIENCE),
        "no audience": (issuer.token(now=now, aud=None), Reason.AUDIENCE),
        "missing exp": (issuer.token(now=now, exp=None), Reason.NO_EXPIRY),
        "exp not a number": (issuer.token(now=now, exp="tomorrow"), Reason.MALFORMED_TOKEN),
        "path-like kid": (issuer.token(now=now, headers={"kid": "../../../../etc/passwd"}), Reason.UNKNOWN_KEY),
        "crit header": (issuer.token(now=now, headers={"crit": ["exp"]}), Reason.MALFORMED_TOKEN),
        "jku pointing elsewhere": (
            issuer.token("rogue", key=issuer.rogue, now=now, headers={"jku": "http://127.0.0.1:1/jwks.json"}),
            Reason.UNKNOWN_KEY,
        ),
    }


async def test_each_bad_token_is_refused_with_its_reason(file_verifier, issuer, clock):
    for case, (token, reason) in bad_tokens(issuer, clock()).items():
        assert await rejection(file_verifier, token) is reason, case
        assert file_verifier.cached(token) is None, case


async def test_rejection_messages_carry_no_token_material(file_verifier, issuer, clock):
    for case, (token, _reason) in bad_tokens(issuer, clock()).items():
        with pytest.raises(TokenRejected) as err:
            await file_verifier.verify(token)
        for part in token.split("."):
            if len(part) > 8:
                assert part not in str(err.value), case


def test_bearer_token_parsing():
    assert bearer_token((("authorization", "Bearer abc.def.ghi"),)) == "abc.def.ghi"
    assert bearer_token((("x-other", "1"), ("authorization", "bearer   abc.def.ghi "))) == "abc.def.ghi"
    cases = {
        (): Reason.MISSING_TOKEN,
        (("authorization", "Basic dXNlcjpwYXNz"),): Reason.MALFORMED_HEADER,
        (("authorization", "Bearer "),): Reason.MALFORMED_HEADER,
        (("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")): Reason.MALFORMED_HEADER,
    }
    for metadata, reason in cases.items():
        with pytest.raises(TokenRejected) as err:
            bearer_token(metadata)
        assert err.value.reason is reason, metadata


# -- the verified-token cache -------------------------------------------------------------------


async def test_cache_answers_repeat_callers_until_expiry(file_verifier, issuer, clock):
    token = issuer.token(now=clock(), exp=int(clock()) + 60, sub="bob")
    assert file_verifier.cached(token) is None
    await file_verifier.verify(token)
    assert file_verifier.cached(token).subject == "bob"
    clock.advance(60 + 29)  # within leeway (30 s)
    assert file_verifier.cached(token).subject == "bob"
    clock.advance(2)
    assert file_verifier.cached(token) is None
    assert await rejection(file_verifier, token) is Reason.EXPIRED


async def test_cache_is_bounded(issuer, tmp_path, clock):
    path = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1")
    source = JwksFileSource(path, ALLOWED, poll_s=3600)
    await source.start()
    try:
        verifier = TokenVerifier(AuthConfig(**auth_block(jwks_file=path, verified_cache_size=5)), source, clock)
        tokens = [issuer.token(now=clock(), sub=f"user-{i}") for i in range(12)]
        for token in tokens:
            await verifier.verify(token)
            assert verifier.cached_tokens <= 5
        assert verifier.cached(tokens[-1]) is not None
    finally:
        await source.close()


async def test_cache_forgets_tokens_of_a_removed_key(file_rig, issuer, clock):
    file_verifier = file_rig.verifier
    token = issuer.token("ec-1", now=clock())
    await file_verifier.verify(token)
    assert file_verifier.cached(token) is not None
    issuer.write_jwks(file_rig.path, "rsa-1", "ed-1")
    assert file_rig.source.reload_if_changed()
    assert file_verifier.cached(token) is None
    assert await rejection(file_verifier, token) is Reason.UNKNOWN_KEY


async def test_adding_a_key_keeps_the_cache(file_rig, issuer, clock):
    file_verifier = file_rig.verifier
    token = issuer.token("rsa-1", now=clock())
    await file_verifier.verify(token)
    issuer.write_jwks(file_rig.path, "rsa-1", "ec-1", "ed-1", "rsa-2")
    assert file_rig.source.reload_if_changed()
    assert file_verifier.cached(token) is not None


# -- scopes and tenants -------------------------------------------------------------------------


def test_scopes_from_scope_scp_and_permissions():
    assert scopes_of({"scope": "infer:a  infer:b admin:routes"}) == {"infer:a", "infer:b", "admin:routes"}
    assert scopes_of({"scp": ["infer:a", "infer:b"]}) == {"infer:a", "infer:b"}
    assert scopes_of({"scp": "infer:a infer:c"}) == {"infer:a", "infer:c"}
    assert scopes_of({"permissions": ["infer:*"], "scope": "admin:routes"}) == {"infer:*", "admin:routes"}
    assert scopes_of({"scope": 7, "scp": [1, None, ""], "permissions": {"infer:*": True}}) == frozenset()


def test_identity_authorizes_by_scope():
    model_scope = identity_from_claims({"sub": "a", "scope": "infer:linear"})
    assert model_scope.may_infer("linear") and not model_scope.may_infer("ab") and not model_scope.may_admin()
    wildcard = identity_from_claims({"sub": "a", "scope": "infer:*"})
    assert wildcard.may_infer("linear") and wildcard.may_infer("anything") and not wildcard.may_admin()
    admin = identity_from_claims({"sub": "a", "scope": "admin:routes"})
    assert admin.may_admin() and not admin.may_infer("linear")


def test_tenant_from_the_configured_claim_else_the_subject():
    assert identity_from_claims({"sub": "alice", "org": "acme"}, "org").tenant == "acme"
    assert identity_from_claims({"sub": "alice", "org": 42}, "org").tenant == "42"
    assert identity_from_claims({"sub": "alice"}, "org").tenant == "alice"
    assert identity_from_claims({"sub": "alice", "org": ["x"]}, "org").tenant == "alice"


# -- key sources --------------------------------------------------------------------------------


def test_jwks_parsing_skips_unusable_keys(issuer):
    small = jwt.get_algorithm_by_name("RS256").to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(), as_dict=True
    )
    private = jwt.get_algorithm_by_name("RS256").to_jwk(issuer.keys["rsa-2"], as_dict=True)
    document = {
        "keys": [
            issuer.jwk("rsa-1"),
            dict(issuer.jwk("ec-1"), use="enc"),
            dict(small, kid="small"),
            dict(private, kid="private"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            dict(issuer.jwk("ed-1"), alg="ES256"),  # alg that does not fit the key type
            "not an object",
        ]
    }
    keys = parse_jwks(json.dumps(document).encode(), ALLOWED)
    assert [key.kid for key in keys.keys] == ["rsa-1"]
    for document in (b"{", b"[]", b'{"keys": 1}', b'{"keys": []}'):
        with pytest.raises(ValueError):
            parse_jwks(document, ALLOWED)


async def test_jwks_file_problems_stop_the_start(tmp_path):
    missing = JwksFileSource(tmp_path / "absent.json", ALLOWED)
    with pytest.raises(AuthSetupError) as err:
        await missing.start()
    assert "auth.jwks_file" in str(err.value)
    (tmp_path / "bad.json").write_text("{}")
    broken = JwksFileSource(tmp_path / "bad.json", ALLOWED)
    with pytest.raises(AuthSetupError) as err:
        await broken.start()
    assert "no 'keys' list" in str(err.value)


async def test_a_broken_jwks_file_keeps_the_previous_keys(file_rig, issuer, clock):
    file_verifier = file_rig.verifier
    file_rig.path.write_text('{"keys": [')
    assert not file_rig.source.reload_if_changed()
    assert await rejection(file_verifier, issuer.token("rsa-1", now=clock())) is None


async def test_hs256_secret_from_the_environment(issuer, clock):
    config = AuthConfig(**auth_block(algorithms=["HS256"], hs256_secret_env="TEST_SECRET"))
    source = SecretKeySource("TEST_SECRET", {"TEST_SECRET": SECRET})
    await source.start()
    verifier = TokenVerifier(config, source, clock)
    claims = issuer.claims(clock())
    good = forge_hs256({"alg": "HS256", "typ": "JWT"}, claims, SECRET.encode())
    assert (await verifier.verify(good)).subject == "alice"
    wrong = forge_hs256({"alg": "HS256"}, claims, b"t" * 40)
    assert await rejection(verifier, wrong) is Reason.BAD_SIGNATURE
    rsa_token = issuer.token(now=clock())
    assert await rejection(verifier, rsa_token) is Reason.ALGORITHM


async def test_hs256_secret_must_be_long_enough():
    for environ in ({}, {"TEST_SECRET": "short"}):
        with pytest.raises(AuthSetupError) as err:
            await SecretKeySource("TEST_SECRET", environ).start()
        assert "TEST_SECRET" in str(err.value) and "short" not in str(err.value)


def test_config_refuses_hs256_mixed_with_asymmetric_algorithms(tmp_path):
    cases = {
        "HS256 with RS256": auth_block(algorithms=["HS256", "RS256"], hs256_secret_env="S"),
        "HS256 with a JWKS": auth_block(algorithms=["HS256"], jwks_file=str(tmp_path / "j.json")),
        "secret with RS256": auth_block(algorithms=["RS256"], hs256_secret_env="S"),
        "none": auth_block(algorithms=["none"], jwks_url="http://x"),
        "two key sources": auth_block(jwks_url="http://x", jwks_file=str(tmp_path / "j.json")),
        "no issuer": auth_block(issuer="", jwks_url="http://x"),
    }
    for case, block in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config({"auth": block})
        assert str(err.value).startswith("auth"), case


@pytest.fixture
async def url_rig(issuer, clock):
    """A verifier over a JWKS URL (a real HTTP server holding rsa-1), TTL 1 h, cooldown 30 s."""
    server = JwksServer(issuer.jwks("rsa-1")).start()
    source = JwksUrlSource(server.url, ALLOWED, ttl_s=3600, cooldown_s=30, clock=clock)
    try:
        await source.start()
        yield UrlRig(TokenVerifier(AuthConfig(**auth_block(jwks_url=server.url)), source, clock), source, server)
    finally:
        await source.close()
        server.stop()


async def test_jwks_url_unknown_kid_fetches_at_most_once_per_cooldown(url_rig, issuer, clock):
    verifier, server = url_rig.verifier, url_rig.server
    assert server.requests == 1
    assert await rejection(verifier, issuer.token("rsa-1", now=clock())) is None

    strangers = [issuer.token(f"unknown-{i}", key=issuer.rogue, now=clock()) for i in range(50)]
    reasons = await asyncio.gather(*(rejection(verifier, token) for token in strangers))
    assert set(reasons) == {Reason.UNKNOWN_KEY}
    assert server.requests == 1  # within the cooldown of the first fetch

    clock.advance(30)
    reasons = await asyncio.gather(*(rejection(verifier, token) for token in strangers))
    assert set(reasons) == {Reason.UNKNOWN_KEY}
    assert server.requests == 2  # fifty callers, one fetch

    server.set_document(issuer.jwks("rsa-1", "rsa-2"))
    rotated = issuer.token("rsa-2", now=clock())
    assert await rejection(verifier, rotated) is Reason.UNKNOWN_KEY  # still cooling down
    assert server.requests == 2
    clock.advance(30)
    assert await rejection(verifier, rotated) is None
    assert server.requests == 3


async def test_jwks_url_failures_keep_the_previous_keys(url_rig, issuer, clock):
    verifier, server, source = url_rig.verifier, url_rig.server, url_rig.source
    server.status = 500
    assert not await source.refresh()
    server.status = 200
    server.set_document({"keys": "nope"})
    assert not await source.refresh()
    server.stop()
    assert not await source.refresh()
    assert await rejection(verifier, issuer.token("rsa-1", now=clock())) is None
    assert [key.kid for key in source.keys.keys] == ["rsa-1"]


async def test_jwks_url_down_at_start_refuses_tokens_then_recovers(issuer, clock):
    server = JwksServer(issuer.jwks("rsa-1")).start()
    url = server.url
    server.stop()
    source = JwksUrlSource(url, ALLOWED, ttl_s=3600, cooldown_s=30, clock=clock)
    verifier = TokenVerifier(AuthConfig(**auth_block(jwks_url=url)), source, clock)
    try:
        await source.start()
        token = issuer.token("rsa-1", now=clock())
        assert await rejection(verifier, token) is Reason.UNKNOWN_KEY
        revived = JwksServer(issuer.jwks("rsa-1")).start(port=int(url.split(":")[2].split("/")[0]))
        try:
            clock.advance(30)
            assert await rejection(verifier, token) is None
        finally:
            revived.stop()
    finally:
        await source.close()


# -- per-tenant rate limits ---------------------------------------------------------------------


def test_token_bucket_per_tenant(clock):
    limiter = TenantRateLimiter(rate_per_s=2, burst=3, clock=clock)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # another tenant has its own bucket
    clock.advance(0.5)  # one token back at 2/s
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    clock.advance(100)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]  # never above the burst


def test_token_bucket_default_burst_is_one_second_of_rate(clock):
    limiter = TenantRateLimiter(rate_per_s=5, clock=clock)
    assert sum(limiter.allow("a") for _ in range(10)) == 5
    slow = TenantRateLimiter(rate_per_s=0.1, clock=clock)
    assert [slow.allow("a") for _ in range(2)] == [True, False]


def test_token_buckets_are_bounded(clock):
    limiter = TenantRateLimiter(rate_per_s=1, burst=1, clock=clock, max_tenants=10)
    for i in range(10):
        limiter.allow(f"t{i}")
    clock.advance(5)  # all refilled: dropping them changes nothing
    limiter.allow("new")
    assert limiter.tenants == 1
    for i in range(30):
        limiter.allow(f"busy{i}")
    assert limiter.tenants <= 10


# -- hygiene ------------------------------------------------------------------------------------


async def test_verifier_logs_carry_the_subject_and_no_token(file_verifier, issuer, clock, caplog):
    caplog.set_level(logging.DEBUG, logger="infergate.gateway.auth")
    good = issuer.token(now=clock(), sub="carol")
    await file_verifier.verify(good)
    tokens = [good] + [token for token, _reason in bad_tokens(issuer, clock()).values()]
    for token in tokens[1:]:
        await rejection(file_verifier, token)
    assert "carol" in caplog.text
    for token in tokens:
        if token.count(".") == 2 and len(signature_of(token)) > 8:
            assert signature_of(token) not in caplog.text
        assert token not in caplog.text
