"""Verification keys: where they come from and how a token's key is found.

A ``KeySet`` is an immutable snapshot: key id -> keys, each bound to the algorithms it may verify
(the JWK's ``alg`` when it has one, else what its type and curve allow), already narrowed to the
configured algorithms. A source replaces its snapshot in one assignment; the verifier only reads.

Sources (exactly one per gateway, chosen by ``auth`` in the config):

- ``SecretKeySource``: the HS256 secret, read from the environment variable named by
  ``hs256_secret_env`` (at least 32 bytes, RFC 7518 section 3.2).
- ``JwksFileSource``: a JWKS file, read again when its mtime, size or inode changes: polled every
  ``jwks_file_poll_s`` by a background task, and checked at once when a token names a key id the
  set does not hold.
- ``JwksUrlSource``: a JWKS document over HTTP(S) fetched with ``httpx.AsyncClient`` (never on the
  event loop's thread): at start, every ``jwks_cache_ttl_s`` from a background task, and on an
  unknown key id at most once per ``jwks_refresh_cooldown_s`` (callers arriving during a fetch
  join it). A failed fetch keeps the previous keys.

``kid`` is only ever a dictionary key: never a path, never part of a URL. The ``jku``, ``x5u``,
``jwk`` and ``x5c`` headers are never looked at: keys come from configuration only. When a key
disappears from a source, ``on_keys_removed`` fires so that tokens verified with it are forgotten.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from infergate.gateway.redaction import add_secret

log = logging.getLogger(__name__)

MIN_HS256_SECRET_BYTES = 32
MIN_RSA_KEY_BITS = 2048
MAX_JWKS_BYTES = 1 << 20
JWKS_FETCH_TIMEOUT_S = 5.0

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_CURVE_ALGORITHMS = {"P-256": frozenset({"ES256"}), "P-384": frozenset({"ES384"}), "P-521": frozenset({"ES512"})}
_OKP_ALGORITHMS = {"Ed25519": frozenset({"EdDSA"}), "Ed448": frozenset({"EdDSA"})}


class AuthSetupError(Exception):
    """Auth cannot start with this configuration; the message names the key and the problem."""


@dataclass(frozen=True)
class VerificationKey:
    """One key and the algorithms it may verify."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any
    """A ``cryptography`` public key, or the HS256 secret as bytes."""
    fingerprint: str
    """Stable text of the public key material, to notice a key that was removed or replaced."""


@dataclass(frozen=True)
class KeySet:
    """An immutable snapshot of the keys a source holds."""

    keys: tuple[VerificationKey, ...] = ()
    any_kid: bool = False
    """True for the single HS256 secret: a token's ``kid`` does not select it."""
    _by_kid: Mapping[str, tuple[VerificationKey, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, keys: Iterable[VerificationKey], any_kid: bool = False) -> KeySet:
        keys = tuple(keys)
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        return cls(keys, any_kid, {kid: tuple(found) for kid, found in by_kid.items()})

    def find(self, kid: str | None, algorithm: str) -> VerificationKey | None:
        """The key for a token with this ``kid`` and ``alg``; None when there is none.

        A token without ``kid`` is only matched when exactly one key fits its algorithm.
        """
        if kid is None or self.any_kid:
            fitting = [key for key in self.keys if algorithm in key.algorithms]
            return fitting[0] if len(fitting) == 1 else None
        for key in self._by_kid.get(kid, ()):
            if algorithm in key.algorithms:
                return key
        return None

    def lost_keys_of(self, older: KeySet) -> bool:
        """True when some key of ``older`` is not in this set (removed or replaced)."""
        mine = {(key.kid, key.fingerprint) for key in self.keys}
        return any((key.kid, key.fingerprint) not in mine for key in older.keys)


def parse_jwks(document: bytes, allowed: frozenset[str]) -> KeySet:
    """Parse a JWKS document into the keys usable with ``allowed`` algorithms.

    Keys for encryption, keys with private material, RSA keys under 2048 bits and keys fitting no
    allowed algorithm are skipped (with a warning naming their ``kid``). Raises ``ValueError`` when
    the document is not a JWKS or holds no usable key; the message never carries key material.
    """
    try:
        parsed = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not valid JSON") from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys = []
    for entry in parsed["keys"]:
        key = _verification_key(entry, allowed)
        if key is not None:
            keys.append(key)
    if not keys:
        raise ValueError(f"no key usable with the configured algorithms {sorted(allowed)}")
    return KeySet.of(keys)


JWK_TEXT_MEMBERS = ("kty", "kid", "use", "alg", "crv", "n", "e", "x", "y", "d", "k")
"""JWK members (RFC 7517/7518) that are strings; a key with any other type in one is skipped."""


def _verification_key(entry: Any, allowed: frozenset[str]) -> VerificationKey | None:
    """The key of one JWKS entry, or None (with a warning) when it is malformed or unusable.

    A JWKS comes from outside: one bad entry must never stop the gateway or the other keys.
    """
    if not isinstance(entry, dict):
        log.warning("JWKS entry that is not an object skipped")
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        log.warning("JWKS key with a non-string kid skipped")
        return None
    wrong = [name for name in JWK_TEXT_MEMBERS if name in entry and not isinstance(entry[name], str)]
    if wrong:
        log.warning("JWKS key %r skipped: member(s) %s are not strings", kid, ",".join(wrong))
        return None
    if entry.get("use", "sig") != "sig":
        return None
    if "d" in entry or entry.get("kty") == "oct":
        log.warning("JWKS key %r skipped: it carries private or symmetric key material", kid)
        return None
    algorithms = _algorithms_of(entry) & allowed
    if not algorithms:
        log.debug("JWKS key %r skipped: fits none of the configured algorithms", kid)
        return None
    try:
        jwk = PyJWK(entry)
    except Exception as exc:  # PyJWTError, ValueError, ...: whatever a malformed key raises, skip it
        log.warning("JWKS key %r skipped: %s", kid, type(exc).__name__)
        return None
    if isinstance(jwk.key, rsa.RSAPublicKey) and jwk.key.key_size < MIN_RSA_KEY_BITS:
        log.warning("JWKS key %r skipped: RSA keys need at least %d bits", kid, MIN_RSA_KEY_BITS)
        return None
    public = {name: value for name, value in entry.items() if name in ("kty", "crv", "n", "e", "x", "y", "alg")}
    return VerificationKey(kid, algorithms, jwk.key, json.dumps(public, sort_keys=True))


def _algorithms_of(entry: dict) -> frozenset[str]:
    """The algorithms a JWK may verify: its ``alg`` if it fits the key type, else all that fit."""
    kty = entry.get("kty")
    if kty == "RSA":
        fitting = _RSA_ALGORITHMS
    elif kty == "EC":
        fitting = _CURVE_ALGORITHMS.get(entry.get("crv"), frozenset())
    elif kty == "OKP":
        fitting = _OKP_ALGORITHMS.get(entry.get("crv"), frozenset())
    else:
        fitting = frozenset()
    alg = entry.get("alg")
    if alg is not None:
        return fitting & {alg}
    return fitting


class KeySource(ABC):
    """Where verification keys come from; ``keys`` is the current snapshot."""

    def __init__(self) -> None:
        self.keys = KeySet()
        self.on_keys_removed: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task] = set()

    @abstractmethod
    async def start(self) -> None:
        """Load the first keys (raise ``AuthSetupError`` when that cannot work) and start background work."""

    async def close(self) -> None:
        """Cancel the background work; safe to call twice."""
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def refresh_for(self, kid: str | None) -> KeySet:
        """Called when no key matches a token: look again if allowed now; return the current set."""
        return self.keys

    def _spawn(self, coroutine, name: str) -> asyncio.Task:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _install(self, keys: KeySet) -> None:
        older, self.keys = self.keys, keys
        if keys.lost_keys_of(older) and self.on_keys_removed is not None:
            self.on_keys_removed()


class SecretKeySource(KeySource):
    """The HS256 secret from an environment variable."""

    def __init__(self, variable: str, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._variable = variable
        self._environ = os.environ if environ is None else environ

    async def start(self) -> None:
        secret = self._environ.get(self._variable, "").encode()
        if len(secret) < MIN_HS256_SECRET_BYTES:
            raise AuthSetupError(
                f"auth.hs256_secret_env: the variable {self._variable} must hold a secret of at least "
                f"{MIN_HS256_SECRET_BYTES} bytes"
            )
        add_secret(secret.decode(errors="replace"))  # masked in every log line from now on
        self._install(KeySet.of([VerificationKey(None, frozenset({"HS256"}), secret, "hs256")], any_kid=True))


class JwksFileSource(KeySource):
    """A JWKS file on disk, read again whenever it changes."""

    def __init__(self, path: Path, allowed: frozenset[str], poll_s: float = 1.0) -> None:
        super().__init__()
        self._path = path
        self._allowed = allowed
        self._poll_s = poll_s
        self._stamp: tuple[int, int, int] | None = None

    async def start(self) -> None:
        try:
            stat = os.stat(self._path)
            self._install(parse_jwks(self._path.read_bytes(), self._allowed))
        except OSError as exc:
            raise AuthSetupError(f"auth.jwks_file: cannot read {self._path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise AuthSetupError(f"auth.jwks_file: {self._path}: {exc}") from exc
        self._stamp = _stamp_of(stat)
        log.info("auth: %d key(s) from %s", len(self.keys.keys), self._path)
        self._spawn(self._poll(), "jwks-file-poll")

    async def refresh_for(self, kid: str | None) -> KeySet:
        self.reload_if_changed()
        return self.keys

    def reload_if_changed(self) -> bool:
        """Read the file again if it changed; True when new keys were installed."""
        try:
            stamp = _stamp_of(os.stat(self._path))
        except OSError as exc:
            if self._stamp is not None:
                log.warning("auth: cannot stat %s (%s); keeping the previous keys", self._path, exc.strerror)
                self._stamp = None
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a broken file is not read again until it changes again
        try:
            keys = parse_jwks(self._path.read_bytes(), self._allowed)
        except (OSError, ValueError) as exc:
            log.warning("auth: %s not usable (%s); keeping the previous keys", self._path, exc)
            return False
        self._install(keys)
        log.info("auth: %s changed, %d key(s) loaded", self._path, len(keys.keys))
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                self.reload_if_changed()
            except Exception:  # keep polling: the previous keys stay in place
                log.exception("auth: checking %s failed", self._path)


def _stamp_of(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class JwksUrlSource(KeySource):
    """A JWKS document over HTTP(S), cached for ``ttl_s`` and refreshed in the background."""

    def __init__(
        self,
        url: str,
        allowed: frozenset[str],
        ttl_s: float,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = JWKS_FETCH_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self._url = url
        self._allowed = allowed
        self._ttl_s = ttl_s
        self._cooldown_s = cooldown_s
        self._retry_s = min(ttl_s, max(cooldown_s, 1.0))
        self._clock = clock
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._fetching: asyncio.Task | None = None
        self._last_attempt = -math.inf
        self._last_ok = False
        self.fetches = 0
        """Fetch attempts so far (for logs and tests)."""

    async def start(self) -> None:
        if not self._url.startswith("https://"):
            log.warning("auth.jwks_url is not https: keys could be swapped in transit")
        self._client = httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False)
        if not await self.refresh():
            log.warning("auth: first fetch of the JWKS failed; tokens are refused until a fetch succeeds")
        self._spawn(self._refresh_loop(), "jwks-url-refresh")

    async def close(self) -> None:
        await super().close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def refresh(self) -> bool:
        """Fetch now, or join the fetch under way; True when usable keys were installed."""
        fetching = self._fetching
        if fetching is None or fetching.done():
            self._last_attempt = self._clock()
            fetching = self._fetching = self._spawn(self._fetch(), "jwks-url-fetch")
        return await asyncio.shield(fetching)

    async def refresh_for(self, kid: str | None) -> KeySet:
        fetching = self._fetching
        if fetching is not None and not fetching.done():
            await asyncio.shield(fetching)
        elif self._clock() - self._last_attempt >= self._cooldown_s:
            log.debug("auth: unknown key id, fetching the JWKS again")
            await self.refresh()
        return self.keys

    async def _fetch(self) -> bool:
        if self._client is None:
            return False
        self.fetches += 1
        try:
            async with self._client.stream("GET", self._url, headers={"accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise ValueError(f"HTTP status {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"document larger than {MAX_JWKS_BYTES} bytes")
            keys = parse_jwks(bytes(body), self._allowed)
        except (httpx.HTTPError, ValueError) as exc:
            self._last_ok = False
            log.warning("auth: fetching the JWKS failed (%s); keeping %d previous key(s)", _describe(exc), len(self.keys.keys))
            return False
        self._last_ok = True
        self._install(keys)
        log.debug("auth: JWKS fetched, %d key(s)", len(keys.keys))
        return True

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s if self._last_ok else self._retry_s)
            try:
                await self.refresh()
            except Exception:  # keep refreshing: the previous keys stay in place
                self._last_ok = False
                log.exception("auth: refreshing the JWKS failed")


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return str(exc)
