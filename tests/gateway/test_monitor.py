"""Model monitoring through a real in-process gateway: drift PSI, class-share shift, feedback accuracy.

Calls go through the unmodified ``tritonclient.grpc.aio`` client to a gateway over ONNX Runtime;
the feedback RPC through its generated stub. Values are read from the gateway's Prometheus
registry, as a scrape would see them.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from prometheus_client import REGISTRY
from tritonclient.grpc import InferInput, InferRequestedOutput

from infergate.gateway._proto.infergate.feedback.v1 import feedback_pb2 as fb
from infergate.gateway._proto.infergate.feedback.v1 import feedback_pb2_grpc as fb_grpc
from infergate.gateway.monitor import build_profile, bucket_counts, psi, read_profile
from tests.conftest import running_gateway
from tests.support.models import CLASSES, FEATURES, classifier

ROWS_PER_CALL = 16
WINDOW_ROWS = 800
SAME_DATA_PSI_AT_MOST = 0.1
"""Sampling noise of two 800-row samples over 10 buckets is about 0.02; no shift stays far below 0.1."""
SHIFTED_PSI_AT_LEAST = 0.25
"""The usual "large shift" line; one standard deviation of shift gives several times that."""


def monitored_config(onnx_gateway_config: dict, model: str, source: str = "linear", **monitoring) -> dict:
    """The test config plus ``model``, a copy of ``source`` under a name of its own (the Prometheus
    registry is the process's: each test reads series no other test wrote), and monitoring on."""
    block = {"enabled": True, "sample_ratio": 1.0, "reference_rows": WINDOW_ROWS, "window_rows": WINDOW_ROWS}
    block.update(monitoring)
    models = dict(onnx_gateway_config["models"], **{model: onnx_gateway_config["models"][source]})
    return dict(onnx_gateway_config, models=models, monitoring=block)


def psi_value(model: str, variant: str, tensor: str, index: int) -> float | None:
    return REGISTRY.get_sample_value(
        "infergate_drift_psi", {"model": model, "variant": variant, "tensor": tensor, "index": str(index)}
    )


async def call(client, model: str, x: np.ndarray, request_id: str = "") -> np.ndarray:
    tensor = InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32))
    result = await client.infer(model, [tensor], outputs=[InferRequestedOutput("PROBS")], request_id=request_id)
    return result.as_numpy("PROBS")


async def send_rows(client, model: str, rng: np.random.Generator, rows: int, shift: float = 0.0) -> None:
    for _ in range(rows // ROWS_PER_CALL):
        await call(client, model, rng.normal(shift, 1.0, (ROWS_PER_CALL, FEATURES)))


# -- the PSI arithmetic ------------------------------------------------------------------------


def test_psi_is_near_zero_for_the_reference_data_and_large_for_shifted_data():
    rng = np.random.default_rng(7)
    reference = rng.normal(0, 1, (5000, 3))
    profile = build_profile("m", {"X": ((0, 1, 2), reference)}, bins=10).tensors["X"]
    assert np.allclose(profile.shares.sum(axis=1), 1.0)
    assert np.allclose(profile.shares, 0.1, atol=0.01)  # quantile edges: each bucket holds a tenth
    same = psi(profile.shares, bucket_counts(reference, profile.edges, 10))
    assert np.all(same < 1e-3)
    fresh = psi(profile.shares, bucket_counts(rng.normal(0, 1, (5000, 3)), profile.edges, 10))
    assert np.all(fresh < 0.02)
    shifted = rng.normal(0, 1, (5000, 3)) + np.array([0.0, 0.5, 2.0])
    values = psi(profile.shares, bucket_counts(shifted, profile.edges, 10))
    assert values[0] < 0.02
    assert 0.1 < values[1] < values[2]
    assert values[2] > 1.0


# -- drift through the gateway -------------------------------------------------------------------


async def test_drift_against_a_reference_captured_from_the_first_calls(onnx_gateway_config):
    rng = np.random.default_rng(1)
    async with running_gateway(monitored_config(onnx_gateway_config, "captured")) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            await send_rows(client, "captured", rng, WINDOW_ROWS)  # the reference
            reference = gateway.monitor.reference("captured")
            assert reference is not None and reference.rows == WINDOW_ROWS
            assert set(reference.tensors) == {"INPUT", "PROBS"}
            assert reference.tensors["INPUT"].indexes == tuple(range(FEATURES))
            assert psi_value("captured", "v1", "INPUT", 0) is None  # no window closed yet
            await send_rows(client, "captured", rng, WINDOW_ROWS)  # one window of the same distribution
            same = [psi_value("captured", "v1", "INPUT", i) for i in range(FEATURES)]
            assert all(value is not None and value < SAME_DATA_PSI_AT_MOST for value in same), same
            assert psi_value("captured", "v1", "PROBS", 0) < SAME_DATA_PSI_AT_MOST  # outputs are watched too
            await send_rows(client, "captured", rng, WINDOW_ROWS, shift=1.0)  # one window shifted by 1 sd
            shifted = [psi_value("captured", "v1", "INPUT", i) for i in range(FEATURES)]
            assert all(value > SHIFTED_PSI_AT_LEAST for value in shifted), shifted
        finally:
            await client.close()


async def test_drift_against_a_profile_file_made_by_the_cli(onnx_gateway_config, tmp_path):
    """``infergate monitor profile`` writes the reference from a CSV; the gateway compares against it at once."""
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, (4000, 2))
    data = tmp_path / "reference.csv"
    data.write_text("INPUT:0,INPUT:3\n" + "\n".join(f"{a},{b}" for a, b in reference), encoding="utf-8")
    profile_path = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "-m", "infergate", "monitor", "profile", "profiled", str(data), "--out",
                           str(profile_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "4000 rows, 1 tensor(s), 2 feature(s)" in done.stdout
    assert read_profile(profile_path).tensors["INPUT"].indexes == (0, 3)
    config = monitored_config(onnx_gateway_config, "profiled", models={"profiled": {"profile": str(profile_path)}})
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            assert gateway.monitor.reference("profiled").rows == 4000  # no capture phase
            x = rng.normal(0, 1, (WINDOW_ROWS, FEATURES))
            x[:, 3] += 2.0  # feature 3 drifts, feature 0 does not
            for start in range(0, WINDOW_ROWS, ROWS_PER_CALL):
                await call(client, "profiled", x[start:start + ROWS_PER_CALL])
        finally:
            await client.close()
    assert psi_value("profiled", "v1", "INPUT", 0) < SAME_DATA_PSI_AT_MOST
    assert psi_value("profiled", "v1", "INPUT", 3) > SHIFTED_PSI_AT_LEAST
    assert psi_value("profiled", "v1", "INPUT", 1) is None  # not in the profile: not watched
    assert psi_value("profiled", "v1", "PROBS", 0) is None


def test_profile_cli_names_a_bad_column(tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("INPUT:x\n1\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "infergate", "monitor", "profile", "linear", str(data), "--out",
                           str(tmp_path / "p.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "column 'INPUT:x' is not TENSOR or TENSOR:INDEX" in done.stderr
    assert "Traceback" not in done.stderr


async def test_class_share_shift_between_variants(onnx_gateway_config):
    """``ab`` serves two different classifiers 50/50: their class shares differ, and the shift says by how much."""
    rng = np.random.default_rng(3)
    config = monitored_config(onnx_gateway_config, "shares", source="ab", window_rows=400, reference_rows=100,
                              models={"shares": {"class_output": "PROBS"}})
    x = rng.normal(0, 1, (4000, FEATURES)).astype(np.float32)
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        try:
            for start in range(0, len(x), ROWS_PER_CALL):
                await call(client, "shares", x[start:start + ROWS_PER_CALL])
        finally:
            await client.close()
    expected = {
        variant: np.bincount(classifier(seed).reference(x)["PROBS"].argmax(axis=1), minlength=CLASSES) / len(x)
        for variant, seed in (("v1", 1), ("v2", 2))
    }
    assert 0.5 * np.abs(expected["v1"] - expected["v2"]).sum() > 0.2  # the two classifiers really disagree here
    exported = {
        variant: np.array([REGISTRY.get_sample_value("infergate_class_share", {"model": "shares", "variant": variant,
                                                                              "class": str(c)}) or 0.0
                           for c in range(CLASSES)])
        for variant in ("v1", "v2")
    }
    for variant in ("v1", "v2"):
        assert exported[variant].sum() == pytest.approx(1.0)
        # the last window's 400 rows: each share within 4 standard deviations (about 0.09) of the whole data's
        assert np.abs(exported[variant] - expected[variant]).max() < 0.09, (variant, exported[variant], expected[variant])
    shift = REGISTRY.get_sample_value("infergate_class_share_shift", {"model": "shares", "variant": "v2"})
    assert shift == pytest.approx(0.5 * np.abs(exported["v1"] - exported["v2"]).sum())
    assert REGISTRY.get_sample_value("infergate_class_share_shift", {"model": "shares", "variant": "v1"}) is None


# -- feedback ----------------------------------------------------------------------------------


async def test_feedback_labels_join_predictions_into_accuracy(onnx_gateway_config):
    rng = np.random.default_rng(4)
    config = monitored_config(onnx_gateway_config, "labelled", sample_ratio=0.0,
                              models={"labelled": {"class_output": "PROBS", "class_names": ["a", "b", "c", "d"]}})
    names = ["a", "b", "c", "d"]
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        stub = fb_grpc.FeedbackStub(channel)
        try:
            predicted = {}
            for i in range(20):
                probs = await call(client, "labelled", rng.normal(0, 1, (2, FEATURES)), request_id=f"req-{i}")
                predicted[f"req-{i}"] = [names[c] for c in probs.argmax(axis=1)]
            outcomes = []
            for i in range(20):  # row 0: right for the first 15, wrong for the last 5 -> 0.75
                truth = predicted[f"req-{i}"][0]
                label = truth if i < 15 else names[(names.index(truth) + 1) % 4]
                outcomes.append(await stub.Report(fb.ReportRequest(request_id=f"req-{i}", label=label)))
            second_row = await stub.Report(fb.ReportRequest(request_id="req-0", label=predicted["req-0"][1], row=1))
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Report(fb.ReportRequest(request_id="never-served", label="a"))
            with pytest.raises(grpc.aio.AioRpcError) as twice:
                await stub.Report(fb.ReportRequest(request_id="req-1", label="a"))
            with pytest.raises(grpc.aio.AioRpcError) as bad_row:
                await stub.Report(fb.ReportRequest(request_id="req-2", label="a", row=5))
        finally:
            await client.close()
            await channel.close()
    assert [o.correct for o in outcomes] == [True] * 15 + [False] * 5
    assert outcomes[0].model == "labelled" and outcomes[0].variant == "v1"
    assert outcomes[0].predicted == predicted["req-0"][0]
    assert second_row.correct
    assert REGISTRY.get_sample_value("infergate_accuracy", {"model": "labelled", "variant": "v1"}) == pytest.approx(16 / 21)
    assert gateway.monitor.accuracy("labelled", "v1") == (pytest.approx(16 / 21), 21)
    assert REGISTRY.get_sample_value("infergate_feedback_total", {"model": "labelled", "variant": "v1",
                                                                   "outcome": "incorrect"}) == 5
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert bad_row.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_prediction_store_is_bounded(onnx_gateway_config):
    config = monitored_config(onnx_gateway_config, "bounded", sample_ratio=0.0, prediction_store_size=5,
                              models={"bounded": {"class_output": "PROBS"}})
    async with running_gateway(config) as gateway:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        stub = fb_grpc.FeedbackStub(channel)
        try:
            for i in range(8):
                await call(client, "bounded", np.ones((1, FEATURES)), request_id=f"r{i}")
            with pytest.raises(grpc.aio.AioRpcError) as dropped:
                await stub.Report(fb.ReportRequest(request_id="r2", label="0"))
            kept = await stub.Report(fb.ReportRequest(request_id="r3", label="0"))
        finally:
            await client.close()
            await channel.close()
    assert dropped.value.code() == grpc.StatusCode.NOT_FOUND
    assert kept.model == "bounded"


async def test_bad_class_output_is_a_startup_error(onnx_gateway_config, no_task_leaks):
    from infergate.gateway.config import parse_config
    from infergate.gateway.server import Gateway, StartupError

    config = monitored_config(onnx_gateway_config, "misnamed", models={"misnamed": {"class_output": "NOPE"}})
    gateway = Gateway(parse_config(dict(config, server={"listen": "127.0.0.1:0", "metrics_listen": ""})))
    try:
        with pytest.raises(StartupError) as err:
            await gateway.start()
    finally:
        await gateway.stop(0)  # what `serve` does after a failed start
    assert "monitoring.models.misnamed.class_output: model has no output 'NOPE'" in str(err.value)


def test_monitoring_config_names_an_unknown_model(onnx_gateway_config):
    from infergate.gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(dict(onnx_gateway_config, monitoring={"enabled": True, "models": {"nope": {}}}))
    assert "monitoring.models.nope: unknown model 'nope'" in str(err.value)
    with pytest.raises(ConfigError) as ratio:
        parse_config(dict(onnx_gateway_config, monitoring={"sample_ratio": 2}))
    assert "monitoring.sample_ratio" in str(ratio.value)
