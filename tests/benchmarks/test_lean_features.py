"""The lean server's features mode (``lean_server --features``), the floor that the gateway's
online-feature cost is compared with: it must do the real work, reading each id's row from a real
Redis, or the comparison flatters the gateway."""

from __future__ import annotations

import numpy as np
import redis
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput

from infergate.benchmarks.feature_fetch import DIM, _model
from infergate.benchmarks.scenarios import LeanProcess


async def test_lean_server_reads_each_entitys_row_from_redis(tmp_path, redis_url):
    rng = np.random.default_rng(4)
    ids = np.array([3, 12, 100, 7], dtype=np.int64)  # ids of different lengths, in no order
    rows = {int(entity): rng.normal(size=DIM).astype("<f4") for entity in ids}
    client = redis.Redis.from_url(redis_url)
    client.mset({f"user_profile:{entity}": row.tobytes() for entity, row in rows.items()})
    client.close()
    lean = LeanProcess(_model(tmp_path / "scorer.onnx"), tmp_path, features=redis_url).start()
    try:
        async with grpcclient.InferenceServerClient(lean.url) as triton:
            by_id = InferInput("USER_ID", [len(ids)], "INT64")
            by_id.set_data_from_numpy(ids)
            fetched = (await triton.infer("fetched", [by_id])).as_numpy("SCORE")
            expected_rows = np.stack([rows[int(entity)] for entity in ids])
            direct_input = InferInput("FEATURES", [len(ids), DIM], "FP32")
            direct_input.set_data_from_numpy(expected_rows)
            direct = (await triton.infer("direct", [direct_input])).as_numpy("SCORE")
    finally:
        lean.stop()
    weights = np.random.default_rng(7).normal(size=(DIM, 2)).astype(np.float32)  # feature_fetch._model's
    np.testing.assert_allclose(direct, expected_rows @ weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fetched, direct)
