"""A test identity provider: keys generated in the test run, tokens signed with pyjwt, and
hand-made bad tokens (``forge``) for the cases pyjwt refuses to produce."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://auth.test.example"
AUDIENCE = "infergate-tests"
ALGORITHM_OF = {"rsa-1": "RS256", "rsa-2": "RS256", "ec-1": "ES256", "ed-1": "EdDSA"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    """A token with exactly this header, these claims and this signature (no checks at all)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(signature)}"


def forge_hs256(header: dict, claims: dict, secret: bytes) -> str:
    """An HS256 token signed with ``secret`` whatever it is (pyjwt refuses a PEM key as secret)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def signature_of(token: str) -> str:
    return token.rsplit(".", 1)[-1]


class Issuer:
    """Holds private keys by kid; mints tokens for ``ISSUER``/``AUDIENCE`` by default."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {
            "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
            "ed-1": ed25519.Ed25519PrivateKey.generate(),
        }
        self.rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.minted: list[str] = []
        """Every token handed out, so tests can check none of them reached a log."""

    def public_pem(self, kid: str) -> bytes:
        return self.keys[kid].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self, kid: str) -> bytes:
        return self.keys[kid].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def jwk(self, kid: str) -> dict:
        algorithm = ALGORITHM_OF[kid]
        jwk = dict(jwt.get_algorithm_by_name(algorithm).to_jwk(self.keys[kid].public_key(), as_dict=True))
        jwk.update(kid=kid, alg=algorithm, use="sig")
        return jwk

    def jwks(self, *kids: str) -> dict:
        return {"keys": [self.jwk(kid) for kid in kids]}

    def write_jwks(self, path: Path, *kids: str) -> Path:
        """Replace the file atomically (new inode), as a deployment tool would."""
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.jwks(*kids)), encoding="utf-8")
        os.replace(temporary, path)
        return path

    def claims(self, now: float | None = None, **overrides: Any) -> dict:
        """Good claims; an override of None removes that claim."""
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": issued,
            "exp": issued + 600,
            "scope": "infer:*",
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def token(self, kid: str = "rsa-1", *, key: Any = None, headers: dict | None = None, now: float | None = None, **claims: Any) -> str:
        """A token signed by ``kid``'s key (or ``key``), with ``kid`` in the header."""
        token = jwt.encode(
            self.claims(now, **claims),
            key if key is not None else self.keys[kid],
            algorithm=ALGORITHM_OF.get(kid, "RS256"),
            headers={"kid": kid, **(headers or {})},
        )
        self.minted.append(token)
        return token

    def keep(self, token: str) -> str:
        self.minted.append(token)
        return token
