"""TritonBackend against the session's real Triton: metadata, answers, and errors mapped at the edge."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from infergate.backends.triton import TritonBackend
from infergate.gateway.config import TritonBackendConfig
from infergate.gateway.errors import BackendUnavailable, DeadlineExceeded, Internal, InvalidArgument, NotFound
from infergate.gateway.local_redis import free_port
from tests.support.models import classifier

pytestmark = pytest.mark.usefixtures("no_task_leaks")


async def started(url: str, timeout_ms: int = 20000) -> TritonBackend:
    backend = TritonBackend("triton_test", TritonBackendConfig(kind="triton", url=url, timeout_ms=timeout_ms))
    await backend.start()
    return backend


def rows(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)


async def test_metadata_comes_from_triton(triton_server):
    backend = await started(triton_server.url)
    try:
        signature = await backend.load("linear_v1")
    finally:
        await backend.close()
    assert [(s.name, s.datatype, s.shape) for s in signature.inputs] == [("INPUT", "FP32", (-1, 16))]
    assert [(s.name, s.datatype, s.shape) for s in signature.outputs] == [("SCORES", "FP32", (-1, 4)), ("PROBS", "FP32", (-1, 4))]
    assert signature.batched
    assert signature.max_batch_size == 256


async def test_infer_matches_the_reference(triton_server):
    backend = await started(triton_server.url)
    try:
        await backend.load("linear_v2")
        assert await backend.ready("linear_v2")
        x = rows(1, 5)
        answer = await backend.infer("linear_v2", {"INPUT": x}, ["SCORES", "PROBS"], time.monotonic() + 30)
        probs = await backend.infer("linear_v2", {"INPUT": x}, ["PROBS"], time.monotonic() + 30)
    finally:
        await backend.close()
    reference = classifier(2).reference(x)
    np.testing.assert_allclose(answer["SCORES"], reference["SCORES"], atol=1e-5)
    np.testing.assert_allclose(answer["PROBS"], reference["PROBS"], atol=1e-5)
    assert list(probs) == ["PROBS"]


async def test_one_channel_serves_many_concurrent_calls(triton_server):
    backend = await started(triton_server.url)
    inputs = [rows(100 + i, 1 + i % 4) for i in range(50)]
    try:
        await backend.load("linear_v1")
        answers = await asyncio.gather(*(backend.infer("linear_v1", {"INPUT": x}, ["SCORES"], time.monotonic() + 60) for x in inputs))
    finally:
        await backend.close()
    for x, answer in zip(inputs, answers):
        np.testing.assert_allclose(answer["SCORES"], classifier(1).reference(x)["SCORES"], atol=1e-5)


async def test_unknown_model_is_not_found_at_load(triton_server):
    backend = await started(triton_server.url)
    try:
        with pytest.raises(NotFound) as err:
            await backend.load("no_such_model")
        ready = await backend.ready("no_such_model")
    finally:
        await backend.close()
    assert "no_such_model" in err.value.message
    assert ready is False


async def test_failing_model_is_internal_not_unknown(triton_server):
    backend = await started(triton_server.url)
    try:
        await backend.load("failing")
        with pytest.raises(Internal) as err:
            await backend.infer("failing", {"INPUT": rows(2)}, ["SCORES"], time.monotonic() + 30)
    finally:
        await backend.close()
    assert type(err.value) is Internal
    assert err.value.code.name == "INTERNAL"
    assert "failing" in err.value.message
    assert "Traceback" not in err.value.message
    assert isinstance(err.value.__cause__, Exception), "the Triton error is kept as the cause"


async def test_tiny_deadline_on_slow_is_deadline_exceeded(triton_server):
    backend = await started(triton_server.url)
    try:
        await backend.load("slow")
        with pytest.raises(DeadlineExceeded) as err:
            await backend.infer("slow", {"INPUT": rows(3)}, ["SCORES"], time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded) as passed:  # no time left at all: not even sent
            await backend.infer("slow", {"INPUT": rows(3)}, ["SCORES"], time.monotonic() - 1)
        x = rows(4, 2)  # and the channel still works
        answer = await backend.infer("linear_v1", {"INPUT": x}, ["SCORES"], time.monotonic() + 30)
    finally:
        await backend.close()
    assert "deadline" in err.value.message
    assert "before the Triton call" in passed.value.message
    np.testing.assert_allclose(answer["SCORES"], classifier(1).reference(x)["SCORES"], atol=1e-5)


async def test_timeout_ms_caps_a_longer_caller_deadline(triton_server):
    backend = await started(triton_server.url, timeout_ms=50)
    try:
        with pytest.raises(DeadlineExceeded):
            await backend.infer("slow", {"INPUT": rows(5)}, ["SCORES"], time.monotonic() + 60)
    finally:
        await backend.close()


async def test_input_triton_rejects_is_invalid_argument(triton_server):
    backend = await started(triton_server.url)
    try:
        with pytest.raises(InvalidArgument) as err:
            await backend.infer("linear_v1", {"INPUT": np.zeros((1, 15), np.float32)}, ["SCORES"], time.monotonic() + 30)
    finally:
        await backend.close()
    assert "linear_v1" in err.value.message


async def test_unreachable_triton_is_backend_unavailable():
    backend = await started(f"127.0.0.1:{free_port()}", timeout_ms=3000)
    try:
        with pytest.raises(BackendUnavailable) as at_load:
            await backend.load("linear_v1")
        with pytest.raises(BackendUnavailable) as at_infer:
            await backend.infer("linear_v1", {"INPUT": rows(6)}, ["SCORES"], time.monotonic() + 3)
        ready = await backend.ready("linear_v1")
    finally:
        await backend.close()
    assert at_load.value.code.name == at_infer.value.code.name == "UNAVAILABLE"
    assert ready is False


async def test_close_twice_then_calls_are_internal(triton_server):
    backend = await started(triton_server.url)
    await backend.close()
    await backend.close()
    assert await backend.ready("linear_v1") is False
    with pytest.raises(Internal):
        await backend.load("linear_v1")
    assert backend.kind == "triton"
