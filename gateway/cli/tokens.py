"""``infergate token`` and ``infergate jwks``: development tokens and the JWKS that verifies them.

    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out dev.pem
    infergate jwks dev.pem --kid dev > jwks.json             # auth.jwks_file: jwks.json
    export INFERGATE_TOKEN=$(infergate token --key dev.pem --kid dev --scope "infer:* admin:routes")

The token is printed alone on stdout. Issuer and audience come from ``--issuer``/``--audience``,
else from ``--config``'s auth block, else ``infergate-dev``/``infergate``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from infergate.gateway.cli.common import EXIT_USAGE

commands = typer.Typer()
DEFAULT_ISSUER = "infergate-dev"
DEFAULT_AUDIENCE = "infergate"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"infergate: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _read_key(path: Path) -> Any:
    from infergate.gateway.auth.tokens import load_private_key

    try:
        return load_private_key(path.read_bytes())
    except OSError as exc:
        raise _fail(f"--key: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise _fail(f"--key: {path}: {exc}") from None


def _parse_claims(pairs: list[str]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise _fail(f"--claim: expected NAME=VALUE, got {pair!r}")
        try:
            claims[name] = json.loads(value)
        except ValueError:
            claims[name] = value
    return claims


@commands.command("token")
def token_command(
    key: Optional[Path] = typer.Option(None, "--key", help="PEM private key (RSA, EC P-256/P-384, Ed25519)."),
    scope: str = typer.Option("infer:*", "--scope", help='Space-separated scopes, e.g. "infer:* admin:routes".'),
    ttl_s: int = typer.Option(3600, "--ttl-s", min=1, help="Lifetime in seconds."),
    issuer: Optional[str] = typer.Option(None, "--issuer", help="iss claim."),
    audience: Optional[str] = typer.Option(None, "--audience", help="aud claim."),
    subject: str = typer.Option("dev", "--subject", help="sub claim (shown in logs and the audit log)."),
    kid: Optional[str] = typer.Option(None, "--kid", help="Key id put in the header (as in your JWKS)."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="RS256, ES256, EdDSA, HS256...; default from the key."),
    claim: list[str] = typer.Option([], "--claim", help="Extra claim NAME=VALUE (JSON values allowed); repeatable."),
    config: Optional[Path] = typer.Option(None, "--config", help="Gateway config to take issuer and audience from."),
    secret_env: str = typer.Option(
        "INFERGATE_JWT_SECRET", "--secret-env", help="Environment variable holding the HS256 secret."
    ),
) -> None:
    """Mint a development token (printed alone on stdout)."""
    from infergate.gateway.auth.tokens import algorithm_for, mint_token

    if config is not None:
        from infergate.gateway.config import ConfigError, load_config

        try:
            auth = load_config(config).auth
        except ConfigError as exc:
            raise _fail(f"config error: {exc}") from None
        issuer = issuer or auth.issuer or None
        audience = audience or auth.audience or None
        if auth.hs256_secret_env:
            secret_env = auth.hs256_secret_env
    if algorithm == "HS256":
        signing_key: Any = os.environ.get(secret_env, "").encode()
        if not signing_key:
            raise _fail(f"--algorithm HS256: the variable {secret_env} holds no secret")
    elif key is None:
        raise _fail("--key is required (or --algorithm HS256 with a secret in the environment)")
    else:
        signing_key = _read_key(key)
        try:
            algorithm = algorithm or algorithm_for(signing_key)
        except ValueError as exc:
            raise _fail(f"--key: {exc}") from None
    try:
        token = mint_token(
            signing_key,
            algorithm=algorithm,
            issuer=issuer or DEFAULT_ISSUER,
            audience=audience or DEFAULT_AUDIENCE,
            subject=subject,
            scopes=scope.split(),
            ttl_s=ttl_s,
            kid=kid,
            claims=_parse_claims(claim),
        )
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise _fail(f"cannot sign with this key and --algorithm {algorithm}: {type(exc).__name__}") from None
    defaults = [f"{name} {value!r}" for name, given, value in (("issuer", issuer, DEFAULT_ISSUER), ("audience", audience, DEFAULT_AUDIENCE)) if not given]
    if defaults:  # on stderr, so that $(infergate token ...) still captures the token alone
        typer.echo(
            f"infergate token: warning: {' and '.join(defaults)} are development defaults; a gateway whose "
            "auth.issuer/auth.audience differ rejects this token (pass --config FILE, or --issuer/--audience)",
            err=True,
        )
    typer.echo(token)


@commands.command("jwks")
def jwks_command(
    key: Path = typer.Argument(..., help="PEM private (or public) key."),
    kid: str = typer.Option("dev", "--kid", help="Key id of the key in the document."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="alg of the key; default from the key."),
) -> None:
    """Print a JWKS document with the public half of KEY (for auth.jwks_file or a JWKS URL)."""
    from cryptography.hazmat.primitives import serialization

    from infergate.gateway.auth.tokens import public_jwks

    try:
        pem = key.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {key}: {exc.strerror or exc}") from None
    try:
        loaded: Any = serialization.load_pem_public_key(pem)
    except ValueError:
        loaded = _read_key(key)
    try:
        document = public_jwks(loaded, kid, algorithm)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise _fail(f"{key}: {exc}") from None
    typer.echo(json.dumps(document, indent=2))
