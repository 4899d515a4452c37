"""Authentication and authorization for the gateway.

- ``keys``: where verification keys come from (HS256 secret, JWKS file, JWKS URL).
- ``verifier``: JWT verification with pinned algorithms, required ``exp``/``iss``/``aud`` and a
  cache of verified tokens; scopes and tenant from the claims.
- ``ratelimit``: per-tenant token buckets.
- ``interceptor``: the grpc.aio server interceptor that refuses calls before any handler runs and
  sets ``gateway.identity.current_identity``; ``Authenticator`` builds all of it from ``AuthConfig``.
- ``tokens`` and ``commands``: ``infergate token`` and ``infergate jwks`` for development keys.

Authorization per model (``infer:<model>``, ``infer:*``) is checked by the inference servicer
where the model name is known; ``admin:routes`` by the admin servicer. Both read
``current_identity``.
"""

from infergate.gateway.auth.interceptor import AuthInterceptor, Authenticator, bearer_token
from infergate.gateway.auth.keys import AuthSetupError, KeySet, parse_jwks
from infergate.gateway.auth.ratelimit import TenantRateLimiter
from infergate.gateway.auth.verifier import Reason, TokenRejected, TokenVerifier, identity_from_claims, scopes_of

__all__ = [
    "AuthInterceptor",
    "AuthSetupError",
    "Authenticator",
    "KeySet",
    "Reason",
    "TenantRateLimiter",
    "TokenRejected",
    "TokenVerifier",
    "bearer_token",
    "identity_from_claims",
    "parse_jwks",
    "scopes_of",
]
