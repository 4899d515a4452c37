"""OnnxBackend on real ONNX Runtime: signatures read from the model, deadlines, providers, and runs
that happen off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infergate.backends.onnx import OnnxBackend
from infergate.gateway.config import OnnxBackendConfig
from infergate.gateway.demo_models import IR_VERSION, OPSET
from infergate.gateway.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound
from tests.support.models import classifier

pytestmark = pytest.mark.usefixtures("no_task_leaks")

HEAVY_SIZE = 512
HEAVY_STEPS = 8
"""8 chained 512x512 @ 512x512 MatMuls on one thread: ~2 GFLOP, far longer than one loop tick."""


def build_heavy_model(path: Path) -> Path:
    """``Y = X @ W @ W ... (HEAVY_STEPS times)``; X FP32 [N, HEAVY_SIZE]. Slow on purpose."""
    rng = np.random.default_rng(0)
    weights = (rng.normal(size=(HEAVY_SIZE, HEAVY_SIZE)) / np.sqrt(HEAVY_SIZE)).astype(np.float32)
    nodes, previous = [], "X"
    for step in range(HEAVY_STEPS):
        output = "Y" if step == HEAVY_STEPS - 1 else f"H{step}"
        nodes.append(helper.make_node("MatMul", [previous, "W"], [output]))
        previous = output
    graph = helper.make_graph(
        nodes,
        "heavy",
        inputs=[helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", HEAVY_SIZE])],
        outputs=[helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", HEAVY_SIZE])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def heavy_model(tmp_path_factory) -> Path:
    return build_heavy_model(tmp_path_factory.mktemp("heavy") / "heavy.onnx")


class StoppedClock:
    """A clock the test sets by hand (time does not pass unless told to)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def started(config: OnnxBackendConfig | None = None, clock=time.monotonic) -> OnnxBackend:
    backend = OnnxBackend("onnx_test", config or OnnxBackendConfig(kind="onnx", intra_op_threads=1), clock)
    await backend.start()
    return backend


async def test_signature_is_read_from_the_model(model_paths):
    backend = await started()
    try:
        linear = await backend.load(str(model_paths["linear_v1"]))
        echo = await backend.load(str(model_paths["echo_bytes"]))
    finally:
        await backend.close()
    assert [(s.name, s.datatype, s.shape) for s in linear.inputs] == [("INPUT", "FP32", (-1, 16))]
    assert [(s.name, s.datatype, s.shape) for s in linear.outputs] == [("SCORES", "FP32", (-1, 4)), ("PROBS", "FP32", (-1, 4))]
    assert linear.batched
    assert linear.platform == "onnxruntime_onnx"
    assert [(s.name, s.datatype, s.shape) for s in echo.inputs] == [("TEXT", "BYTES", (-1,))]
    assert [(s.name, s.datatype, s.shape) for s in echo.outputs] == [("ECHO", "BYTES", (-1,))]


async def test_infer_matches_the_reference_and_returns_requested_outputs(model_paths):
    backend = await started()
    model = str(model_paths["linear_v2"])
    try:
        await backend.load(model)
        assert await backend.ready(model)
        x = np.random.default_rng(3).normal(size=(7, 16)).astype(np.float32)
        both = await backend.infer(model, {"INPUT": x}, ["SCORES", "PROBS"], time.monotonic() + 30)
        probs_only = await backend.infer(model, {"INPUT": x}, ["PROBS"], time.monotonic() + 30)
    finally:
        await backend.close()
    reference = classifier(2).reference(x)
    np.testing.assert_allclose(both["SCORES"], reference["SCORES"], atol=1e-5)
    np.testing.assert_allclose(both["PROBS"], reference["PROBS"], atol=1e-5)
    assert list(probs_only) == ["PROBS"]
    assert not await backend.ready(model)  # closed


async def test_bytes_round_trip_as_bytes(model_paths):
    backend = await started()
    model = str(model_paths["echo_bytes"])
    try:
        await backend.load(model)
        items = np.array([b"", "héllo".encode(), "日本".encode()], dtype=np.object_)
        answer = await backend.infer(model, {"TEXT": items}, ["ECHO"], time.monotonic() + 30)
    finally:
        await backend.close()
    assert answer["ECHO"].dtype == np.object_
    assert list(answer["ECHO"]) == list(items)
    assert all(isinstance(item, bytes) for item in answer["ECHO"])


async def test_deadline_already_passed_is_refused_without_running(model_paths):
    """The inputs are wrong for the model: had ONNX Runtime run, it would have said INVALID_ARGUMENT."""
    clock = StoppedClock()
    backend = await started(clock=clock)
    model = str(model_paths["linear_v1"])
    try:
        await backend.load(model)
        wrong = {"INPUT": np.zeros((1, 3), np.float32)}
        with pytest.raises(DeadlineExceeded) as passed:
            await backend.infer(model, wrong, ["SCORES"], deadline=clock.now - 0.001)
        with pytest.raises(DeadlineExceeded) as exactly_now:
            await backend.infer(model, wrong, ["SCORES"], deadline=clock.now)
        with pytest.raises(InvalidArgument) as ran:  # same inputs with time left: ONNX Runtime runs and refuses
            await backend.infer(model, wrong, ["SCORES"], deadline=clock.now + 30)
    finally:
        await backend.close()
    assert "before the ONNX run" in passed.value.message
    assert "before the ONNX run" in exactly_now.value.message
    assert "rejected the input" in ran.value.message


async def test_deadline_passing_during_a_run_is_deadline_exceeded_and_the_backend_recovers(heavy_model):
    backend = await started(OnnxBackendConfig(kind="onnx", intra_op_threads=1, pool_threads=1))
    model = str(heavy_model)
    x = np.ones((HEAVY_SIZE, HEAVY_SIZE), np.float32)
    try:
        await backend.load(model)
        with pytest.raises(DeadlineExceeded) as err:
            await backend.infer(model, {"X": x}, ["Y"], time.monotonic() + 0.001)
        # The terminated run frees the single pool thread; the next call runs to completion.
        answer = await backend.infer(model, {"X": x[:2]}, ["Y"], time.monotonic() + 60)
    finally:
        await backend.close()
    assert "during the ONNX run" in err.value.message
    assert answer["Y"].shape == (2, HEAVY_SIZE)
    assert np.isfinite(answer["Y"]).all()


async def test_runs_happen_off_the_event_loop(heavy_model):
    """While a long run is awaited the loop keeps turning; a run on the loop thread would freeze it."""
    backend = await started()
    model = str(heavy_model)
    try:
        await backend.load(model)
        run = asyncio.create_task(
            backend.infer(model, {"X": np.ones((HEAVY_SIZE, HEAVY_SIZE), np.float32)}, ["Y"], time.monotonic() + 120)
        )
        ticks = 0
        while True:
            await asyncio.sleep(0.001)
            if run.done():
                break
            ticks += 1
        answer = run.result()
    finally:
        await backend.close()
    assert ticks > 0
    assert answer["Y"].shape == (HEAVY_SIZE, HEAVY_SIZE)


async def test_concurrent_runs_each_get_their_own_answer(model_paths):
    backend = await started(OnnxBackendConfig(kind="onnx", intra_op_threads=1, pool_threads=2))
    model = str(model_paths["linear_v1"])
    inputs = [np.random.default_rng(i).normal(size=(1 + i % 5, 16)).astype(np.float32) for i in range(40)]
    try:
        await backend.load(model)
        answers = await asyncio.gather(*(backend.infer(model, {"INPUT": x}, ["SCORES"], time.monotonic() + 60) for x in inputs))
    finally:
        await backend.close()
    for x, answer in zip(inputs, answers):
        np.testing.assert_allclose(answer["SCORES"], classifier(1).reference(x)["SCORES"], atol=1e-5)


@pytest.mark.parametrize(
    "providers",
    [("CPUExecutionProvider",), ("NoSuchExecutionProvider", "CPUExecutionProvider")],
    ids=["cpu", "unavailable-then-cpu"],
)
async def test_providers_come_from_config(model_paths, providers):
    backend = await started(OnnxBackendConfig(kind="onnx", providers=providers))
    model = str(model_paths["linear_v1"])
    try:
        await backend.load(model)
        assert backend.providers == list(providers)
        used = backend.session_providers(model)
    finally:
        await backend.close()
    assert used == ["CPUExecutionProvider"]


async def test_no_available_provider_fails_the_load(model_paths):
    backend = await started(OnnxBackendConfig(kind="onnx", providers=("NoSuchExecutionProvider",)))
    try:
        with pytest.raises(Internal) as err:
            await backend.load(str(model_paths["linear_v1"]))
    finally:
        await backend.close()
    assert "NoSuchExecutionProvider" in err.value.message


async def test_missing_and_corrupt_model_files(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an onnx model")
    backend = await started()
    try:
        with pytest.raises(NotFound) as missing:
            await backend.load(str(tmp_path / "absent.onnx"))
        with pytest.raises(Internal) as broken:
            await backend.load(str(corrupt))
        with pytest.raises(Internal) as not_loaded:
            await backend.infer(str(tmp_path / "absent.onnx"), {}, ["Y"], time.monotonic() + 5)
        assert not await backend.ready(str(corrupt))
    finally:
        await backend.close()
    assert "absent.onnx" in missing.value.message
    assert "corrupt.onnx" in broken.value.message
    assert "not loaded" in not_loaded.value.message


async def test_close_twice_and_infer_after_close(model_paths):
    backend = await started()
    model = str(model_paths["linear_v1"])
    await backend.load(model)
    await backend.close()
    await backend.close()
    with pytest.raises(Internal):
        await backend.infer(model, {"INPUT": np.zeros((1, 16), np.float32)}, ["SCORES"], time.monotonic() + 5)
    assert backend.kind == "onnx"
