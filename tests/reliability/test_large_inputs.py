"""Large inputs must not freeze the event loop (issue 9, item 3): real Redis, real ONNX Runtime.

A feature model given 8M entity ids blocked every other call for about 8 s. Class of defect: O(n)
Python work on the event loop before any bound was checked. Now the rows a call may carry are
bounded for every model with online features (``features.max_entities``, default 1024, and the
model's batch limit), and the declared batch dimension is checked before any tensor is decoded
(BYTES, typed contents), so the work done for a refused call does not grow with its size.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.conftest import running_gateway
from tests.gateway.test_features import config as feature_config
from tests.gateway.test_features import scorer_path  # noqa: F401  (fixture)

pytestmark = pytest.mark.reliability

HUGE = 2_000_000
LOOP_STALL_LIMIT_S = 0.5


class LoopWatch:
    """The longest the event loop went without running this task's 10 ms tick."""

    def __init__(self) -> None:
        self.worst_s = 0.0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "LoopWatch":
        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                self.worst_s = max(self.worst_s, now - last - 0.01)
                last = now

        self._task = asyncio.create_task(tick())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def entity_request(rows: int, typed_bytes: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="scorer")
    if typed_bytes:
        entity = request.inputs.add(name="USER_ID", datatype="BYTES", shape=[rows])
        entity.contents.bytes_contents.extend([b"u1"] * rows)
        context = request.inputs.add(name="CONTEXT", datatype="FP32", shape=[rows, 2])
        context.contents.fp32_contents.extend([0.5] * (rows * 2))
        return request
    request.inputs.add(name="USER_ID", datatype="INT64", shape=[rows])
    request.inputs.add(name="CONTEXT", datatype="FP32", shape=[rows, 2])
    request.raw_input_contents.append(np.arange(rows, dtype="<i8").tobytes())
    request.raw_input_contents.append(np.zeros((rows, 2), dtype="<f4").tobytes())
    return request


@pytest.mark.parametrize("typed_bytes,rows", [(False, HUGE), (True, HUGE // 10)], ids=["raw INT64 ids", "typed BYTES ids"])
async def test_too_many_entities_are_refused_without_stalling_the_loop(scorer_path, redis_url, typed_bytes, rows):  # noqa: F811
    request = entity_request(rows, typed_bytes)
    config = feature_config(scorer_path, redis_url)
    # 32 MB of ids: past the 4 MiB default grpc itself would refuse them; this is about the gateway.
    config["server"] = {**config.get("server", {}), "max_message_bytes": 64 << 20}
    async with running_gateway(config) as gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = GRPCInferenceServiceStub(channel)
            async with LoopWatch() as watch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfer(request, timeout=60)
            model_config = await stub.ModelConfig(pb.ModelConfigRequest(name="scorer"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the model's max_batch_size 1024" in err.value.details()
    assert watch.worst_s < LOOP_STALL_LIMIT_S, f"the event loop stalled {watch.worst_s:.2f}s"
    assert model_config.config.max_batch_size == 1024
