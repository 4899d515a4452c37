"""Development tokens and JWKS documents from a key file (``infergate token``, ``infergate jwks``).

For tests, demos and local work only: production tokens come from an identity provider. The
algorithm follows the key unless given: RSA -> RS256, EC P-256 -> ES256, P-384 -> ES384,
Ed25519 -> EdDSA; HS256 signs with a secret taken from the environment.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

_CURVE_ALGORITHM = {"secp256r1": "ES256", "secp384r1": "ES384"}


def load_private_key(pem: bytes) -> Any:
    """A private key from PEM (unencrypted); raises ``ValueError`` with a short message."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unencrypted PEM private key (RSA, EC P-256/P-384 or Ed25519)") from exc


def algorithm_for(key: Any) -> str:
    """The signature algorithm that goes with a private or public key."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RS256"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        algorithm = _CURVE_ALGORITHM.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"EC curve {key.curve.name} is not supported (use P-256 or P-384)")
        return algorithm
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey, ed448.Ed448PrivateKey)):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def mint_token(
    key: Any,
    *,
    algorithm: str,
    issuer: str,
    audience: str,
    subject: str,
    scopes: Sequence[str],
    ttl_s: float,
    kid: str | None = None,
    claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A signed JWT with ``iss``, ``aud``, ``sub``, ``iat``, ``exp``, ``scope`` and extra ``claims``."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "exp": issued + int(ttl_s),
        "scope": " ".join(scopes),
    }
    payload.update(claims or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def public_jwks(key: Any, kid: str, algorithm: str | None = None) -> dict[str, Any]:
    """A JWKS document holding the public half of ``key`` under ``kid``."""
    public = key.public_key() if hasattr(key, "public_key") else key
    algorithm = algorithm or algorithm_for(public)
    jwk = dict(jwt.get_algorithm_by_name(algorithm).to_jwk(public, as_dict=True))
    jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
    return {"keys": [jwk]}
