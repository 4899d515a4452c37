"""A Triton Inference Server reached over gRPC with tritonclient's protocol stubs.

One ``grpc.aio`` channel (one HTTP/2 connection) per backend, opened in ``start`` and reused by
every call, with tritonclient's generated ``GRPCInferenceServiceStub``. Inference requests are
built directly as ``ModelInferRequest`` messages with raw contents (the rows of a batch are
already one contiguous array each) and answers are read with ``np.frombuffer`` over
``raw_output_contents``: no per-tensor wrapper objects on the hot path, which is what
tritonclient's high-level ``InferenceServerClient.infer`` would add to every call. The caller's
remaining deadline becomes the call's timeout, capped by ``timeout_ms``. Triton's errors are
mapped to the gateway's at this edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

from infergate.backends.base import Backend, ModelSignature, TensorSpec
from infergate.backends.datatypes import NUMPY_DTYPES, decode_bytes, raw_contents, triton_datatype
from infergate.gateway.config import TritonBackendConfig, split_host_port
from infergate.gateway.errors import BackendUnavailable, DeadlineExceeded, GatewayError, Internal, error_for_status

_READY_TIMEOUT_S = 1.0
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Come back quickly after Triton restarts instead of backing off for a minute.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonBackend(Backend):
    def __init__(
        self, name: str, config: TritonBackendConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(name, clock)
        self._config = config
        self._max_timeout_s = config.timeout_ms / 1000
        self._span_attributes: dict[str, object] = {
            "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
        }
        try:
            host, port = split_host_port(config.url)
            self._span_attributes.update({"server.address": host, "server.port": port})
        except ValueError:  # a gRPC target that is not host:port (dns:///...): named as it is
            self._span_attributes["server.address"] = config.url
        self._channel: grpc.aio.Channel | None = None
        self._stub: GRPCInferenceServiceStub | None = None

    @property
    def kind(self) -> str:
        return "triton"

    @property
    def span_attributes(self) -> Mapping[str, object]:
        return self._span_attributes

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self._config.url, options=_CHANNEL_OPTIONS)
        self._stub = GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    @property
    def stub(self) -> GRPCInferenceServiceStub:
        if self._stub is None:
            raise Internal(f"backend {self.name} is not started")
        return self._stub

    async def load(self, model: str) -> ModelSignature:
        timeout = self._max_timeout_s
        try:
            metadata = await self.stub.ModelMetadata(tpb.ModelMetadataRequest(name=model), timeout=timeout)
            config = (await self.stub.ModelConfig(tpb.ModelConfigRequest(name=model), timeout=timeout)).config
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, f"Triton model {model}") from exc
        return ModelSignature(
            inputs=tuple(_spec(t) for t in metadata.inputs),
            outputs=tuple(_spec(t) for t in metadata.outputs),
            batched=config.max_batch_size > 0,
            max_batch_size=config.max_batch_size,
            platform=metadata.platform or config.backend,
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        timeout = min(deadline - self._clock(), self._max_timeout_s)
        if timeout <= 0:
            raise DeadlineExceeded("deadline passed before the Triton call")
        request = tpb.ModelInferRequest(model_name=model)
        for name, array in inputs.items():
            datatype = triton_datatype(array.dtype)
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(raw_contents(array, datatype))
        for name in outputs:
            request.outputs.add(name=name)
        try:
            response = await self.stub.ModelInfer(
                request, timeout=timeout, metadata=tuple(headers.items()) if headers else None
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, f"Triton model {model}") from exc
        return _outputs(response, outputs, model)

    async def ready(self, model: str) -> bool:
        if self._stub is None:
            return False
        try:
            answer = await self._stub.ModelReady(tpb.ModelReadyRequest(name=model), timeout=_READY_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return answer.ready


def _outputs(response: tpb.ModelInferResponse, names: Sequence[str], model: str) -> dict[str, np.ndarray]:
    """The requested outputs of a Triton answer, as arrays over its raw contents."""
    raw = response.raw_output_contents
    answer = {}
    for index, tensor in enumerate(response.outputs):
        if tensor.name not in names:
            continue
        if index >= len(raw):
            raise Internal(f"Triton model {model} returned output {tensor.name} without raw contents")
        shape = tuple(tensor.shape)
        try:
            if tensor.datatype == "BYTES":
                count = int(np.prod(shape, dtype=np.int64))
                array = decode_bytes(raw[index], count).reshape(shape)
            else:
                array = np.frombuffer(raw[index], dtype=NUMPY_DTYPES[tensor.datatype].newbyteorder("<")).reshape(shape)
        except (KeyError, ValueError) as exc:
            raise Internal(f"Triton model {model} returned a malformed output {tensor.name}") from exc
        answer[tensor.name] = array
    missing = [name for name in names if name not in answer]
    if missing:
        raise Internal(f"Triton model {model} returned no output {missing[0]}")
    return answer


def _translate(exc: grpc.aio.AioRpcError, what: str) -> GatewayError:
    code = exc.code()
    details = exc.details() or ""
    message = details.splitlines()[0][:300] if details else code.name
    # A Python model's failure message ends in its traceback header; callers never get tracebacks.
    message = message.split("Traceback (most recent call last)")[0].rstrip(" :") or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what}: deadline exceeded at the backend")
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailable(f"{what}: backend unavailable: {message}")
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        return Internal(f"{what}: {message}")
    return error_for_status(code, f"{what}: {message}")


def _spec(tensor) -> TensorSpec:
    return TensorSpec(tensor.name, tensor.datatype, tuple(int(d) for d in tensor.shape))
