"""``infergate token`` and ``infergate jwks``: the tokens they mint verify with pyjwt, and a gateway
configured with the printed JWKS accepts them."""

from __future__ import annotations

import json

import jwt
import pytest
import tritonclient.grpc.aio as aioclient
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from infergate.gateway.cli import app
from tests.gateway.auth.conftest import auth_block, bearer, row
from tests.conftest import running_gateway
from tests.support.models import onnx_config

runner = CliRunner()


def write_key(key, path):
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def run(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env)


def test_token_carries_what_was_asked(tmp_path, rsa_key):
    key = write_key(rsa_key, tmp_path / "dev.pem")
    result = run(
        "token", "--key", str(key), "--kid", "dev", "--scope", "infer:* admin:routes", "--ttl-s", "120",
        "--issuer", "https://idp.example", "--audience", "gw", "--subject", "alice",
        "--claim", "tenant=acme", "--claim", "level=3",
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    claims = jwt.decode(token, rsa_key.public_key(), algorithms=["RS256"], audience="gw", issuer="https://idp.example")
    assert jwt.get_unverified_header(token)["kid"] == "dev"
    assert claims["scope"] == "infer:* admin:routes"
    assert (claims["sub"], claims["tenant"], claims["level"]) == ("alice", "acme", 3)
    assert claims["exp"] - claims["iat"] == 120


@pytest.mark.parametrize(
    "make_key, algorithm",
    [(lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"), (ed25519.Ed25519PrivateKey.generate, "EdDSA")],
)
def test_algorithm_follows_the_key(tmp_path, make_key, algorithm):
    private = make_key()
    key = write_key(private, tmp_path / "k.pem")
    result = run("token", "--key", str(key))
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    claims = jwt.decode(token, private.public_key(), algorithms=[algorithm], audience="infergate", issuer="infergate-dev")
    assert claims["scope"] == "infer:*"


def test_issuer_and_audience_from_the_gateway_config(tmp_path, rsa_key):
    key = write_key(rsa_key, tmp_path / "dev.pem")
    (tmp_path / "jwks.json").write_text("{}")
    config = tmp_path / "gw.yaml"
    config.write_text(yaml.safe_dump({"auth": auth_block(issuer="https://from-config", audience="cfg", jwks_file="jwks.json")}))
    result = run("token", "--key", str(key), "--config", str(config))
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.stdout.strip(), rsa_key.public_key(), algorithms=["RS256"], audience="cfg")
    assert claims["iss"] == "https://from-config"


def test_hs256_signs_with_the_secret_from_the_environment():
    secret = "z" * 40
    result = run("token", "--algorithm", "HS256", "--secret-env", "MY_SECRET", env={"MY_SECRET": secret})
    assert result.exit_code == 0, result.output
    assert jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"], audience="infergate")["sub"] == "dev"


def test_usage_errors_exit_2_with_one_line(tmp_path, rsa_key):
    (tmp_path / "junk.pem").write_text("not a key")
    good = write_key(rsa_key, tmp_path / "dev.pem")
    cases = [
        (["token"], "--key is required"),
        (["token", "--key", str(tmp_path / "absent.pem")], "cannot read"),
        (["token", "--key", str(tmp_path / "junk.pem")], "not an unencrypted PEM private key"),
        (["token", "--algorithm", "HS256", "--secret-env", "UNSET_SECRET_VAR"], "holds no secret"),
        (["token", "--key", str(good), "--claim", "novalue"], "--claim: expected NAME=VALUE"),
        (["jwks", str(tmp_path / "junk.pem")], "not an unencrypted PEM private key"),
    ]
    for args, message in cases:
        result = run(*args, env={"UNSET_SECRET_VAR": ""})
        assert result.exit_code == 2, args
        assert message in result.output, args
        assert "Traceback" not in result.output


async def test_a_gateway_with_the_printed_jwks_accepts_the_minted_token(tmp_path, rsa_key, model_paths, no_task_leaks):
    key = write_key(rsa_key, tmp_path / "dev.pem")
    jwks = run("jwks", str(key), "--kid", "dev-1")
    assert jwks.exit_code == 0, jwks.output
    assert json.loads(jwks.stdout)["keys"][0]["kid"] == "dev-1"
    (tmp_path / "jwks.json").write_text(jwks.stdout)
    token = run("token", "--key", str(key), "--kid", "dev-1", "--scope", "infer:linear", "--issuer", "dev", "--audience", "gw")
    assert token.exit_code == 0, token.output
    config = dict(
        onnx_config(model_paths),
        auth=auth_block(issuer="dev", audience="gw", algorithms=["RS256"], jwks_file=str(tmp_path / "jwks.json")),
    )
    async with running_gateway(config) as gateway:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            result = await client.infer("linear", row(), headers=bearer(token.stdout.strip()))
        finally:
            await client.close()
    assert result.as_numpy("PROBS").shape == (1, 4)
