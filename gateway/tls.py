"""Client-side TLS for the gateway's own clients: the admin CLI, ``infergate bench``, the tests.

One function turns the usual three options into something each client library takes:

    tls = client_tls(ca_file, cert_file, key_file)      # None when all three are None
    grpc.aio.secure_channel(target, tls.channel_credentials())
    tritonclient.grpc.aio.InferenceServerClient(url, **tls.tritonclient_kwargs())
    run_load(..., ssl=tls.tritonclient_kwargs())

``ca_file`` is the CA that signed the gateway's certificate (system roots when omitted);
``cert_file``/``key_file`` are the client's certificate and key, needed when the gateway sets
``server.tls.client_ca_file`` (mutual TLS) and only together. ``open_channel`` picks a secure or
plaintext ``grpc.aio`` channel. Bad options raise ``TlsOptionsError`` naming the option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


class TlsOptionsError(ValueError):
    """The TLS options cannot work; the message names the option (print it, exit 2)."""


@dataclass(frozen=True)
class ClientTls:
    """Files for a TLS (or mutual TLS) connection to the gateway."""

    ca_file: Path | None = None
    """PEM CA bundle that signed the server's certificate; None uses the system roots."""
    cert_file: Path | None = None
    """PEM client certificate chain for mutual TLS."""
    key_file: Path | None = None
    """PEM private key of ``cert_file``."""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for ``grpc.secure_channel`` / ``grpc.aio.secure_channel``."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "--ca-file"),
            private_key=_read(self.key_file, "--key-file"),
            certificate_chain=_read(self.cert_file, "--cert-file"),
        )

    def tritonclient_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for tritonclient's ``InferenceServerClient`` (and ``run_load(ssl=...)``)."""
        return {
            "ssl": True,
            "root_certificates": str(self.ca_file) if self.ca_file else None,
            "private_key": str(self.key_file) if self.key_file else None,
            "certificate_chain": str(self.cert_file) if self.cert_file else None,
        }


def client_tls(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> ClientTls | None:
    """Validated client TLS settings; None when no option is given (plaintext)."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if (cert_file is None) != (key_file is None):
        raise TlsOptionsError("--cert-file and --key-file go together (mutual TLS needs both)")
    paths = {}
    for option, value in (("--ca-file", ca_file), ("--cert-file", cert_file), ("--key-file", key_file)):
        if value is not None:
            path = Path(value)
            if not path.is_file():
                raise TlsOptionsError(f"{option}: file not found: {path}")
            paths[option] = path
    return ClientTls(paths.get("--ca-file"), paths.get("--cert-file"), paths.get("--key-file"))


def open_channel(
    target: str, tls: ClientTls | None = None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target``: TLS when ``tls`` is given, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options)


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsOptionsError(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc
