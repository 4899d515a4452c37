"""Online features from a real Redis, added by the gateway before the ONNX model runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import onnx
import pytest
import redis
import tritonclient.grpc.aio as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from infergate.gateway.local_redis import free_port
from tests.conftest import running_gateway

DIM = 8
W_FEATURES = np.arange(DIM * 2, dtype=np.float32).reshape(DIM, 2) / 10
W_CONTEXT = np.array([[1.0, -1.0], [0.5, 0.25]], dtype=np.float32)


def reference(features: np.ndarray, context: np.ndarray) -> np.ndarray:
    return features @ W_FEATURES + context @ W_CONTEXT


@pytest.fixture(scope="module")
def scorer_path(tmp_path_factory):
    """SCORE [N, 2] = FEATURES [N, 8] @ Wf + CONTEXT [N, 2] @ Wc."""
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["FEATURES", "WF"], ["A"]),
            helper.make_node("MatMul", ["CONTEXT", "WC"], ["B"]),
            helper.make_node("Add", ["A", "B"], ["SCORE"]),
        ],
        name="scorer",
        inputs=[
            helper.make_tensor_value_info("FEATURES", TensorProto.FLOAT, ["N", DIM]),
            helper.make_tensor_value_info("CONTEXT", TensorProto.FLOAT, ["N", 2]),
        ],
        outputs=[helper.make_tensor_value_info("SCORE", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(W_FEATURES, "WF"), numpy_helper.from_array(W_CONTEXT, "WC")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("features") / "scorer.onnx"
    onnx.save(model, str(path))
    return path


def config(scorer_path, redis_url: str, **view_overrides) -> dict:
    view = {"key_template": "user_profile:{id}", "encoding": "float32", "dim": DIM, "timeout_ms": 500}
    view.update(view_overrides)
    return {
        "redis": {"url": redis_url},
        "backends": {"onnx_cpu": {"kind": "onnx"}},
        "feature_views": {"user_profile": view},
        "models": {
            "scorer": {
                "features": {"view": "user_profile", "entity_input": "USER_ID", "feature_input": "FEATURES"},
                "variants": {"v1": {"backend": "onnx_cpu", "path": str(scorer_path), "weight": 1}},
            }
        },
    }


def store(redis_url: str, rows: dict[str, np.ndarray]) -> None:
    client = redis.Redis.from_url(redis_url)
    for entity, vector in rows.items():
        client.set(f"user_profile:{entity}", vector.astype("<f4").tobytes())
    client.close()


def inputs(ids, context: np.ndarray, datatype: str = "BYTES", shape=None) -> list[InferInput]:
    array = np.array(ids, dtype=np.object_ if datatype == "BYTES" else np.int64)
    if shape is not None:
        array = array.reshape(shape)
    entity = InferInput("USER_ID", list(array.shape), datatype)
    entity.set_data_from_numpy(array)
    ctx = InferInput("CONTEXT", list(context.shape), "FP32")
    ctx.set_data_from_numpy(context)
    return [entity, ctx]


async def call(port: int, tensors) -> np.ndarray:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return (await client.infer("scorer", tensors)).as_numpy("SCORE")
    finally:
        await client.close()


async def test_features_from_redis_feed_the_model(scorer_path, redis_url):
    rng = np.random.default_rng(3)
    rows = {"u1": rng.normal(size=DIM), "u2": rng.normal(size=DIM), "42": rng.normal(size=DIM)}
    store(redis_url, rows)
    context = rng.normal(size=(2, 2)).astype(np.float32)
    async with running_gateway(config(scorer_path, redis_url)) as gateway:
        by_name = await call(gateway.port, inputs([b"u2", b"u1"], context))
        by_int = await call(gateway.port, inputs([42, 42], context, "INT64", (2, 1)))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        metadata = await client.get_model_metadata("scorer", as_json=True)
        await client.close()
    expected = reference(np.stack([rows["u2"], rows["u1"]]).astype(np.float32), context)
    assert np.allclose(by_name, expected, atol=1e-5)
    assert np.allclose(by_int, reference(np.stack([rows["42"]] * 2).astype(np.float32), context), atol=1e-5)
    # Callers see the entity input, never the backend's feature input.
    assert sorted(i["name"] for i in metadata["inputs"]) == ["CONTEXT", "USER_ID"]


async def test_missing_entity_is_zeros_or_not_found(scorer_path, redis_url):
    store(redis_url, {"known": np.ones(DIM)})
    context = np.ones((2, 2), np.float32)
    async with running_gateway(config(scorer_path, redis_url, on_missing="zeros")) as gateway:
        answer = await call(gateway.port, inputs([b"known", b"stranger"], context))
    assert np.allclose(answer[1], reference(np.zeros((1, DIM), np.float32), context[1:]), atol=1e-6)
    assert np.allclose(answer[0], reference(np.ones((1, DIM), np.float32), context[:1]), atol=1e-5)
    async with running_gateway(config(scorer_path, redis_url, on_missing="error")) as gateway:
        with pytest.raises(InferenceServerException) as err:
            await call(gateway.port, inputs([b"known", b"stranger"], context))
        still_served = await call(gateway.port, inputs([b"known"], context[:1]))
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "stranger" in err.value.message()
    assert still_served.shape == (1, 2)


async def test_redis_down_fails_or_serves_zeros_by_view_choice(scorer_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    context = np.ones((1, 2), np.float32)
    async with running_gateway(config(scorer_path, dead, on_error="fail")) as gateway:
        with pytest.raises(InferenceServerException) as err:
            await call(gateway.port, inputs([b"u1"], context))
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    async with running_gateway(config(scorer_path, dead, on_error="zeros")) as gateway:
        answer = await call(gateway.port, inputs([b"u1"], context))
    assert np.allclose(answer, reference(np.zeros((1, DIM), np.float32), context), atol=1e-6)


async def test_wrong_entity_dtype_is_invalid_argument(scorer_path, redis_url):
    context = np.ones((1, 2), np.float32)
    bad = InferInput("USER_ID", [1], "FP32")
    bad.set_data_from_numpy(np.ones(1, np.float32))
    ctx = InferInput("CONTEXT", [1, 2], "FP32")
    ctx.set_data_from_numpy(context)
    async with running_gateway(config(scorer_path, redis_url)) as gateway:
        with pytest.raises(InferenceServerException) as err:
            await call(gateway.port, [bad, ctx])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_cli_loads_csv_rows(scorer_path, redis_url, tmp_path):
    import yaml

    config_path = tmp_path / "gw.yaml"
    config_path.write_text(yaml.safe_dump(config(scorer_path, redis_url)))
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("user_id," + ",".join(f"f{i}" for i in range(DIM)) + "\n"
                        + "alice," + ",".join(str(i) for i in range(DIM)) + "\n"
                        + "bob," + ",".join(str(-i) for i in range(DIM)) + "\n")
    done = subprocess.run([sys.executable, "-m", "infergate", "features", "load", "user_profile", str(csv_path),
                           "--config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "loaded 2 row(s)" in done.stdout
    client = redis.Redis.from_url(redis_url)
    alice = np.frombuffer(client.get("user_profile:alice"), "<f4")
    client.close()
    assert np.array_equal(alice, np.arange(DIM, dtype=np.float32))
    short = tmp_path / "short.csv"
    short.write_text("user_id,f0\ncarol,1.0\n")
    bad = subprocess.run([sys.executable, "-m", "infergate", "features", "load", "user_profile", str(short),
                          "--config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "short.csv:2" in bad.stderr and "Traceback" not in bad.stderr


async def test_bulk_fetch_reads_keys_around_the_id_and_refuses_malformed_rows(redis_url):
    from infergate.gateway.config import FeatureViewConfig
    from infergate.gateway.errors import Internal
    from infergate.gateway.features import FeatureStore, entity_ids

    view = FeatureViewConfig(key_template="fs:{{v2}}:{id}:row", dim=DIM, timeout_ms=1000)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(5)
    rows = {f"e{i}": rng.normal(size=DIM).astype("<f4") for i in range(64)}
    for entity, vector in rows.items():
        client.set(f"fs:{{v2}}:{entity}:row", vector.tobytes())
    client.set("fs:{v2}:short:row", b"\x00" * 4)
    client.close()
    store = FeatureStore(redis_url, {"v": view})
    await store.start()
    try:
        ids = entity_ids(np.array([e.encode() for e in rows], dtype=np.object_))
        fetched, misses = await store.fetch("v", ids, deadline=1e12)
        partial, partial_misses = await store.fetch("v", [b"e3", b"nobody"], deadline=1e12)
        with pytest.raises(Internal) as err:
            await store.fetch("v", [b"e1", b"short"], deadline=1e12)
    finally:
        await store.close()
    np.testing.assert_array_equal(fetched, np.stack(list(rows.values())))
    assert misses == 0 and partial_misses == 1
    np.testing.assert_array_equal(partial, np.stack([rows["e3"], np.zeros(DIM, "<f4")]))
    assert "malformed row" in err.value.message and "short" in err.value.message


@pytest.mark.parametrize("prefix, suffix", [(b"user_profile:", b""), (b"a%d{", b"}%s:x"), (b"", b"")])
def test_mget_template_packs_int64_ids_as_hiredis_does(prefix, suffix):
    """Every id length (1-19 digits, with and without a minus sign), mixed in one command, and a
    template holding ``%`` (which the one-format build must not read as a placeholder)."""
    import hiredis

    from infergate.gateway.features import MgetTemplate

    int64 = np.iinfo(np.int64)
    edges = [0, 9, 10, 99, 100, 10**18 - 1, 10**18, int64.max, -1, -9, -10, -(10**18), int64.min + 1]
    cases = [np.array(edges), np.arange(64), np.arange(-32, 32).reshape(-1, 1), np.array([7]),
             np.random.default_rng(3).integers(-(10**12), 10**12, size=300)]
    template = MgetTemplate(prefix, suffix)
    for ids in cases:
        ids = ids.astype(np.int64)
        keys = [prefix + b"%d" % entity + suffix for entity in ids.reshape(-1).tolist()]
        assert template.command(ids) == hiredis.pack_command((b"MGET", *keys))
    assert template.command(np.array([int64.min, 1], dtype=np.int64)) is None  # fetched through the keys instead


async def test_int64_ids_of_every_length_fetch_their_own_rows(redis_url):
    """INT64 ids go through the one-format MGET: rows come back in the ids' order, a missing id is
    zeros, and int64's minimum (which the template leaves to the per-key path) is read too."""
    from infergate.gateway.config import FeatureViewConfig
    from infergate.gateway.features import FeatureStore

    int64 = np.iinfo(np.int64)
    ids = np.array([5, -5, 12, 123456789, int64.max, -(10**15), 0, int64.min], dtype=np.int64)
    rng = np.random.default_rng(11)
    rows = {int(entity): rng.normal(size=DIM).astype("<f4") for entity in ids}
    client = redis.Redis.from_url(redis_url)
    for entity, vector in rows.items():
        client.set(f"i64:{{x}}%:{entity}", vector.tobytes())
    client.close()
    store = FeatureStore(redis_url, {"v": FeatureViewConfig(key_template="i64:{{x}}%:{id}", dim=DIM, timeout_ms=1000)})
    await store.start()
    try:
        fetched, misses = await store.fetch("v", ids.reshape(-1, 1), deadline=1e12)
        with_missing, missing = await store.fetch("v", np.array([12, 77777, -5], dtype=np.int64), deadline=1e12)
        with_min, min_misses = await store.fetch("v", ids[::-1].copy(), deadline=1e12)
    finally:
        await store.close()
    np.testing.assert_array_equal(fetched, np.stack([rows[int(e)] for e in ids]))
    assert misses == 0 and missing == 1 and min_misses == 0
    np.testing.assert_array_equal(with_missing, np.stack([rows[12], np.zeros(DIM, "<f4"), rows[-5]]))
    np.testing.assert_array_equal(with_min, np.stack([rows[int(e)] for e in ids[::-1]]))


async def test_a_fetch_cut_off_by_its_timeout_never_hands_its_late_reply_to_the_next_fetch(redis_url):
    """The reply of a timed-out MGET arrives later on its connection; the next fetch must get its own rows."""
    from infergate.gateway.config import FeatureViewConfig
    from infergate.gateway.errors import Unavailable
    from infergate.gateway.features import FeatureStore

    view = FeatureViewConfig(key_template="late:{id}", dim=DIM, timeout_ms=100)
    client = redis.Redis.from_url(redis_url)
    first, second = (np.full(DIM, value, "<f4") for value in (1.0, 2.0))
    client.set("late:a", first.tobytes())
    client.set("late:b", second.tobytes())
    store = FeatureStore(redis_url, {"v": view})
    await store.start()
    try:
        await store.fetch("v", [b"b"], deadline=1e12)  # one pooled connection, now idle
        # Redis holds every other client's commands for 0.4 s: the fetch of "a" times out with its
        # MGET sent and unanswered; the reply comes once the pause ends.
        client.execute_command("CLIENT", "PAUSE", "400", "ALL")
        with pytest.raises(Unavailable):
            await store.fetch("v", [b"a"], deadline=1e12)
        await asyncio.sleep(0.5)
        rows, misses = await store.fetch("v", [b"b"], deadline=1e12)
    finally:
        await store.close()
        client.close()
    np.testing.assert_array_equal(rows, second[None, :])
    assert misses == 0


async def test_concurrent_fetches_share_one_connection_opened_at_start(redis_url):
    """Opening connections on demand under a burst (redis-py's pool opens one per concurrent
    command, each slow to set up) made the first calls after a start miss the view's timeout."""
    from infergate.gateway.config import FeatureViewConfig
    from infergate.gateway.features import FeatureStore

    view = FeatureViewConfig(key_template="burst:{id}", dim=DIM, timeout_ms=1000)
    client = redis.Redis.from_url(redis_url)
    rows = {f"e{i}": np.full(DIM, i, "<f4") for i in range(64)}
    client.mset({f"burst:{entity}": vector.tobytes() for entity, vector in rows.items()})
    before = int(client.info("stats")["total_connections_received"])
    store = FeatureStore(redis_url, {"v": view})
    await store.start()
    try:
        fetched = await asyncio.gather(*(store.fetch("v", [entity.encode()], deadline=1e12) for entity in rows))
        opened = int(client.info("stats")["total_connections_received"]) - before
    finally:
        await store.close()
        client.close()
    assert [rows_[0][0, 0] for rows_ in fetched] == [float(i) for i in range(64)]
    assert opened == 1
