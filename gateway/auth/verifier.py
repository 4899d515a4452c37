"""Bearer token verification (RFC 7519, following RFC 8725's best current practice).

``TokenVerifier.verify`` accepts a token only when all of this holds:

- its header's ``alg`` is one of the configured algorithms (the token never chooses: ``none``
  and an HS256 token against RSA keys fail here), with no ``crit`` or ``b64`` header;
- a key of the current ``KeySet`` fits its ``kid`` and ``alg`` (an unknown ``kid`` may make the
  key source look again, within its cooldown) and the signature verifies with that key;
- ``exp`` is present and not passed, ``nbf`` (when present) is reached, both give or take
  ``leeway_s``; ``iss`` equals the configured issuer; ``aud`` is or contains the audience.

A verified token is remembered under the SHA-256 of its text until ``exp + leeway_s``, so a
repeat caller costs ``cached``: one hash, one dict lookup and one clock read. The cache is emptied
when a key disappears from the key source. Rejections raise ``TokenRejected`` with a fixed
``Reason``; no message ever carries the token, its signature or key material.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from jwt import PyJWS
from jwt.exceptions import InvalidSignatureError, PyJWTError

from infergate.gateway.auth.keys import KeySource
from infergate.gateway.config import AuthConfig
from infergate.gateway.errors import Unauthenticated
from infergate.gateway.identity import Identity

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 16 * 1024
SCOPE_CLAIMS = ("scope", "scp", "permissions")


class Reason(enum.Enum):
    """Why a token was refused: the caller's message, and the metric label (the member name)."""

    MISSING_TOKEN = "missing bearer token (authorization metadata)"
    MALFORMED_HEADER = "authorization metadata is not 'Bearer <token>'"
    MALFORMED_TOKEN = "malformed token"
    ALGORITHM = "token algorithm not accepted"
    UNKNOWN_KEY = "token signing key not known"
    BAD_SIGNATURE = "token signature does not verify"
    NO_EXPIRY = "token has no exp claim"
    EXPIRED = "token expired"
    NOT_YET_VALID = "token not valid yet (nbf)"
    ISSUER = "token issuer not accepted"
    AUDIENCE = "token audience not accepted"


class TokenRejected(Unauthenticated):
    """The call's credentials are missing or not acceptable (UNAUTHENTICATED)."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def token_digest(token: str) -> bytes:
    """The cache key of a token: its SHA-256, so the cache never holds a usable token."""
    return hashlib.sha256(token.encode()).digest()


class TokenVerifier:
    """Verifies bearer tokens against one key source and remembers the ones that passed."""

    def __init__(self, config: AuthConfig, keys: KeySource, clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._clock = clock
        self._algorithms = frozenset(config.algorithms)
        self._issuer = config.issuer
        self._audience = config.audience
        self._leeway_s = float(config.leeway_s)
        self._tenant_claim = config.tenant_claim
        self._cache_size = config.verified_cache_size
        self._cache: dict[bytes, tuple[float, Identity]] = {}
        self._jws = PyJWS()
        keys.on_keys_removed = self.forget_all

    @property
    def cached_tokens(self) -> int:
        return len(self._cache)

    def cached(self, token: str) -> Identity | None:
        """The identity of a token verified before and not yet expired; None otherwise."""
        entry = self._cache.get(token_digest(token))
        if entry is not None and self._clock() < entry[0]:
            return entry[1]
        return None

    def forget_all(self) -> None:
        """Drop every remembered token (a key was removed: its tokens must be checked again)."""
        self._cache.clear()

    async def verify(self, token: str) -> Identity:
        """Verify ``token`` fully; return its identity or raise ``TokenRejected``."""
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise TokenRejected(Reason.MALFORMED_TOKEN)
        try:
            header = self._jws.get_unverified_header(token)
        except PyJWTError as exc:
            raise TokenRejected(Reason.MALFORMED_TOKEN) from exc
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise TokenRejected(Reason.ALGORITHM)
        if "crit" in header or "b64" in header:
            raise TokenRejected(Reason.MALFORMED_TOKEN)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected(Reason.MALFORMED_TOKEN)
        key = self._keys.keys.find(kid, algorithm)
        if key is None:
            key = (await self._keys.refresh_for(kid)).find(kid, algorithm)
            if key is None:
                raise TokenRejected(Reason.UNKNOWN_KEY)
        try:
            payload = self._jws.decode(token, key.key, algorithms=[algorithm])
        except InvalidSignatureError as exc:
            raise TokenRejected(Reason.BAD_SIGNATURE) from exc
        except PyJWTError as exc:
            raise TokenRejected(Reason.MALFORMED_TOKEN) from exc
        try:
            claims = json.loads(payload, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise TokenRejected(Reason.MALFORMED_TOKEN) from exc
        if not isinstance(claims, dict):
            raise TokenRejected(Reason.MALFORMED_TOKEN)
        valid_until = self._check_claims(claims)
        identity = identity_from_claims(claims, self._tenant_claim)
        self._remember(token_digest(token), valid_until, identity)
        log.debug("auth: token verified for subject %s (kid %r)", identity.subject, kid)
        return identity

    def _check_claims(self, claims: Mapping[str, Any]) -> float:
        """Check the registered claims; return the time until which the token is acceptable."""
        now = self._clock()
        expires = claims.get("exp")
        if expires is None:
            raise TokenRejected(Reason.NO_EXPIRY)
        if not _is_number(expires):
            raise TokenRejected(Reason.MALFORMED_TOKEN)
        if now >= expires + self._leeway_s:
            raise TokenRejected(Reason.EXPIRED)
        not_before = claims.get("nbf")
        if not_before is not None:
            if not _is_number(not_before):
                raise TokenRejected(Reason.MALFORMED_TOKEN)
            if now + self._leeway_s < not_before:
                raise TokenRejected(Reason.NOT_YET_VALID)
        if claims.get("iss") != self._issuer:
            raise TokenRejected(Reason.ISSUER)
        audience = claims.get("aud")
        if isinstance(audience, list):
            accepted = self._audience in audience
        else:
            accepted = audience == self._audience
        if not accepted:
            raise TokenRejected(Reason.AUDIENCE)
        return float(expires) + self._leeway_s

    def _remember(self, digest: bytes, valid_until: float, identity: Identity) -> None:
        if self._cache_size == 0:
            return
        if len(self._cache) >= self._cache_size:
            self._evict()
        self._cache[digest] = (valid_until, identity)

    def _evict(self) -> None:
        """Drop expired entries; if that frees nothing, the oldest tenth (insertion order)."""
        now = self._clock()
        expired = [digest for digest, (until, _identity) in self._cache.items() if until <= now]
        for digest in expired:
            del self._cache[digest]
        if len(self._cache) >= self._cache_size:
            for digest in list(self._cache)[: max(1, self._cache_size // 10)]:
                del self._cache[digest]


MAX_NUMERIC_DATE = 2**53
"""A NumericDate beyond this (about 285 million years) is not a time: the token is malformed."""


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity: Python's json accepts them


def _is_number(value: Any) -> bool:
    """A NumericDate (RFC 7519 2): a finite JSON number in a sane range (not NaN, inf, 1e400, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -MAX_NUMERIC_DATE < value < MAX_NUMERIC_DATE and math.isfinite(value)  # NaN fails both


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (space-separated), ``scp`` and ``permissions`` (lists or strings)."""
    scopes: set[str] = set()
    for name in SCOPE_CLAIMS:
        value = claims.get(name)
        if isinstance(value, str):  # RFC 6749 3.3: scopes are separated by ASCII space (0x20) only
            scopes.update(item for item in value.split(" ") if item)
        elif isinstance(value, list):
            scopes.update(item for item in value if isinstance(item, str) and item)
    return frozenset(scopes)


def identity_from_claims(claims: Mapping[str, Any], tenant_claim: str = "sub") -> Identity:
    """Subject, scopes and tenant of verified claims; a missing tenant claim falls back to ``sub``."""
    subject = claims.get("sub")
    subject = subject if isinstance(subject, str) else ""
    tenant = claims.get(tenant_claim)
    if isinstance(tenant, bool) or not isinstance(tenant, (str, int)) or tenant == "":
        tenant = subject
    return Identity(subject=subject, scopes=scopes_of(claims), tenant=str(tenant))
