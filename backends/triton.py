"""A Triton Inference Server reached over gRPC with ``tritonclient.grpc.aio``.

One client (one HTTP/2 channel) per backend, opened in ``start`` and reused by every call. The
caller's remaining deadline becomes the call's ``client_timeout``, capped by ``timeout_ms``.
Triton's errors are mapped to the gateway's at this edge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from infergate.backends.base import Backend, ModelSignature, TensorSpec
from infergate.backends.datatypes import triton_datatype
from infergate.gateway.config import TritonBackendConfig
from infergate.gateway.errors import BackendUnavailable, DeadlineExceeded, GatewayError, Internal, error_for_status

_STATUS_BY_NAME = {str(code): code for code in grpc.StatusCode}
_READY_TIMEOUT_S = 1.0


class TritonBackend(Backend):
    def __init__(
        self, name: str, config: TritonBackendConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(name, clock)
        self._config = config
        self._client: triton_aio.InferenceServerClient | None = None

    @property
    def kind(self) -> str:
        return "triton"

    async def start(self) -> None:
        self._client = triton_aio.InferenceServerClient(
            self._config.url,
            channel_args=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
                # Come back quickly after Triton restarts instead of backing off for a minute.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    @property
    def client(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            raise Internal(f"backend {self.name} is not started")
        return self._client

    async def load(self, model: str) -> ModelSignature:
        timeout = self._config.timeout_ms / 1000
        try:
            metadata = await self.client.get_model_metadata(model, as_json=True, client_timeout=timeout)
            config = (await self.client.get_model_config(model, as_json=True, client_timeout=timeout))["config"]
        except InferenceServerException as exc:
            raise _translate(exc, f"Triton model {model}") from exc
        max_batch_size = int(config.get("max_batch_size", 0))
        batched = max_batch_size > 0
        return ModelSignature(
            inputs=tuple(_spec(t) for t in metadata.get("inputs", [])),
            outputs=tuple(_spec(t) for t in metadata.get("outputs", [])),
            batched=batched,
            max_batch_size=max_batch_size,
            platform=metadata.get("platform", "") or config.get("backend", ""),
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        timeout = min(self.remaining_s(deadline), self._config.timeout_ms / 1000)
        if timeout <= 0:
            raise DeadlineExceeded("deadline passed before the Triton call")
        infer_inputs = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), _datatype(array))
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        try:
            result = await self.client.infer(
                model,
                infer_inputs,
                outputs=[InferRequestedOutput(name) for name in outputs],
                client_timeout=timeout,
                headers=dict(headers) if headers else None,
            )
        except InferenceServerException as exc:
            raise _translate(exc, f"Triton model {model}") from exc
        answer = {}
        for name in outputs:
            array = result.as_numpy(name)
            if array is None:
                raise Internal(f"Triton model {model} returned no output {name}")
            answer[name] = array
        return answer

    async def ready(self, model: str) -> bool:
        if self._client is None:
            return False
        try:
            return bool(await self._client.is_model_ready(model, client_timeout=_READY_TIMEOUT_S))
        except (InferenceServerException, asyncio.TimeoutError, grpc.RpcError):
            return False


def _translate(exc: InferenceServerException, what: str) -> GatewayError:
    code = _STATUS_BY_NAME.get(exc.status() or "", grpc.StatusCode.INTERNAL)
    message = (exc.message() or "").splitlines()[0][:300] if exc.message() else code.name
    # A Python model's failure message ends in its traceback header; callers never get tracebacks.
    message = message.split("Traceback (most recent call last)")[0].rstrip(" :") or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what}: deadline exceeded at the backend")
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailable(f"{what}: backend unavailable: {message}")
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        return Internal(f"{what}: {message}")
    return error_for_status(code, f"{what}: {message}")


def _spec(tensor: dict) -> TensorSpec:
    return TensorSpec(tensor["name"], tensor["datatype"], tuple(int(d) for d in tensor.get("shape", [])))


def _datatype(array: np.ndarray) -> str:
    return triton_datatype(array.dtype)
