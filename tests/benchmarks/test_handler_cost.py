"""The in-process handler-cost benchmark drives the production handler chain of every config."""

from __future__ import annotations

import argparse

from infergate.benchmarks import handler_cost


async def test_every_target_answers_through_the_handler_chain():
    args = argparse.Namespace(rounds=1, calls=20, only="")
    rounds = await handler_cost._main(args)
    assert set(rounds) == {"lean", "plain", "auth", "2var", "batch", "full"}
    assert all(len(values) == 1 and values[0] > 0 for values in rounds.values())


async def test_a_refused_call_is_not_counted_as_an_answer(tmp_path):
    """The harness must fail loudly when the chain refuses (a wrong token), not time refusals."""
    import json

    import pytest
    from cryptography.hazmat.primitives.asymmetric import rsa

    from infergate.gateway.auth.tokens import public_jwks

    model = handler_cost._mlp(tmp_path / "mlp.onnx")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(key, "k1", "RS256")))
    gateway, call, _serialize = await handler_cost._gateway_call(handler_cost._configs(model, jwks)["auth"])
    try:
        request = handler_cost.pb.ModelInferRequest(model_name="mlp")
        with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
            await call(request.SerializeToString(), handler_cost._Context((("authorization", "Bearer nope"),)))
    finally:
        await gateway.stop(0)


async def test_feature_handler_cost_times_every_target_and_they_answer_alike():
    """``feature_handler_cost`` checks that the gateway and the lean server, fetched and direct,
    give the same scores before it times them (it raises otherwise)."""
    from infergate.benchmarks import feature_handler_cost

    args = argparse.Namespace(rounds=1, calls=64, concurrency=4, redis_cpus="", only="")
    rounds = await feature_handler_cost._main(args)
    assert set(rounds) == {"lean-direct", "lean-fetched", "direct", "fetched"}
    assert all(len(values) == 1 and values[0] > 0 for values in rounds.values())
