"""Fixtures of the auth tests: a test identity provider (keys made here, tokens signed with pyjwt),
configs with an ``auth`` block, gateway processes that log at DEBUG (so the hygiene checks see
everything the gateway could write), and tritonclient calls with a bearer token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from tests.gateway.auth.issuer import AUDIENCE, ISSUER, Issuer
from tests.support.models import FEATURES, onnx_config
from tests.support.processes import GatewayProcess

CALL_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def issuer() -> Issuer:
    return Issuer()


def auth_block(**overrides) -> dict:
    """An ``auth`` config block for the test issuer; overrides replace keys."""
    block = {
        "mode": "jwt",
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ["RS256", "ES256", "EdDSA"],
        "leeway_s": 30,
    }
    block.update(overrides)
    return block


def gateway_config(model_paths: dict[str, Path], **auth_overrides) -> dict:
    return dict(onnx_config(model_paths), auth=auth_block(**auth_overrides))


def start_gateway(config: dict, workdir: Path, name: str, extra_env: dict[str, str] | None = None) -> GatewayProcess:
    """``infergate serve --log-level debug`` on ``config``; the caller stops it."""
    process = GatewayProcess(config, workdir, name=name, extra_env=extra_env)
    process.argv += ["--log-level", "debug"]
    return process.start()


def row() -> list[InferInput]:
    tensor = InferInput("INPUT", [1, FEATURES], "FP32")
    tensor.set_data_from_numpy(np.ones((1, FEATURES), dtype=np.float32))
    return [tensor]


def bearer(token: str | None) -> dict[str, str] | None:
    return None if token is None else {"authorization": f"Bearer {token}"}


def infer(client: grpcclient.InferenceServerClient, token: str | None, model: str = "linear", headers: dict | None = None):
    """One ModelInfer on ``model`` with ``token``; returns the result or raises InferenceServerException."""
    return client.infer(model, row(), headers={**(bearer(token) or {}), **(headers or {})}, client_timeout=CALL_TIMEOUT_S)


def status_of(call, *args, **kwargs) -> str:
    """The gRPC status name a call ends with ('OK' when it succeeds)."""
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return (exc.status() or "").removeprefix("StatusCode.")
    return "OK"
