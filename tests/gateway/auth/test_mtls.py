"""TLS and mutual TLS on a real ``infergate serve``, with certificates made in the test.

Clients use ``gateway.tls`` (the helper the admin CLI and ``infergate bench`` use) to build
tritonclient's TLS arguments and grpc channel credentials.
"""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infergate.gateway.tls import TlsOptionsError, client_tls
from tests.gateway.auth.certs import make_pki
from tests.gateway.auth.conftest import CALL_TIMEOUT_S, gateway_config, infer, status_of
from tests.support.models import onnx_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_server(pki, mutual: bool) -> dict:
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    if mutual:
        tls["client_ca_file"] = str(pki.ca)
    return {"tls": tls}


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(gateway_process, pki, issuer, model_paths, tmp_path):
    jwks = issuer.write_jwks(tmp_path / "jwks.json", "rsa-1")
    config = dict(gateway_config(model_paths, jwks_file=str(jwks)), server=tls_server(pki, mutual=True))
    process = gateway_process(config, "mtls")
    token = issuer.token(scope="infer:linear", sub="svc-fraud")
    clients = {
        "CA-signed certificate": client_tls(pki.ca, pki.client_cert, pki.client_key),
        "no certificate": client_tls(pki.ca),
        "certificate from another CA": client_tls(pki.ca, pki.stranger_cert, pki.stranger_key),
    }
    seen = {}
    for name, tls in clients.items():
        client = grpcclient.InferenceServerClient(process.url, **tls.tritonclient_kwargs())
        try:
            seen[name] = status_of(infer, client, token)
        finally:
            client.close()
    plaintext = grpcclient.InferenceServerClient(process.url)
    try:
        seen["plaintext"] = status_of(infer, plaintext, token)
    finally:
        plaintext.close()
    with grpc.secure_channel(process.url, clients["CA-signed certificate"].channel_credentials()) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    assert seen == {
        "CA-signed certificate": "OK",
        "no certificate": "UNAVAILABLE",
        "certificate from another CA": "UNAVAILABLE",
        "plaintext": "UNAVAILABLE",
    }
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_server_tls_without_client_certificates(gateway_process, pki, model_paths):
    config = dict(onnx_config(model_paths), server=tls_server(pki, mutual=False))
    process = gateway_process(config, "tls")
    client = grpcclient.InferenceServerClient(process.url, **client_tls(ca_file=pki.ca).tritonclient_kwargs())
    untrusting = grpcclient.InferenceServerClient(process.url, ssl=True)  # system roots do not know our CA
    try:
        assert infer(client, None).as_numpy("PROBS").shape == (1, 4)
        assert status_of(infer, untrusting, None) == "UNAVAILABLE"
    finally:
        client.close()
        untrusting.close()


def test_client_tls_options_are_checked(pki, tmp_path):
    assert client_tls() is None
    assert client_tls(pki.ca).tritonclient_kwargs() == {
        "ssl": True, "root_certificates": str(pki.ca), "private_key": None, "certificate_chain": None,
    }
    problems = [
        (dict(cert_file=pki.client_cert), "--cert-file and --key-file go together"),
        (dict(key_file=pki.client_key), "--cert-file and --key-file go together"),
        (dict(ca_file=tmp_path / "absent.pem"), "--ca-file: file not found"),
    ]
    for options, expected in problems:
        with pytest.raises(TlsOptionsError) as err:
            client_tls(**options)
        assert expected in str(err.value), options


def test_admin_cli_over_mutual_tls(gateway_process, pki, model_paths):
    import json
    import subprocess
    import sys

    config = dict(onnx_config(model_paths), server=tls_server(pki, mutual=True))
    process = gateway_process(config, "mtls-admin")
    base = [sys.executable, "-m", "infergate", "routes", "--gateway", process.url, "--json", "--ca-file", str(pki.ca),
            "--timeout-s", "10"]
    admitted = subprocess.run(base + ["--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key)],
                              capture_output=True, text=True, timeout=60)
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    half = subprocess.run(base + ["--cert-file", str(pki.client_cert)], capture_output=True, text=True, timeout=60)
    assert admitted.returncode == 0, admitted.stderr
    assert {route["model"] for route in json.loads(admitted.stdout)["routes"]} == {"linear", "ab", "echo"}
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
    assert half.returncode == 2 and "--key-file" in half.stderr and "Traceback" not in half.stderr
