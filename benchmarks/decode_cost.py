"""What request decoding/validation and response encoding cost per call, in process.

    python -m infergate.benchmarks.decode_cost [--calls 20000] [--repeats 7] [--json out.json]

Times ``decode_infer_request`` and ``encode_infer_response`` (``gateway/converters.py``) with
``time.perf_counter_ns`` loops, one loop of ``--calls`` calls per repeat, and reports the median
of the repeats in microseconds per call. Each decode gets a message freshly parsed from the wire
bytes (parsed before the clock starts), as the server does, so upb's lazily built field wrappers
are paid for as they are in a real call. The cases:

- ``mlp``: the pinned benchmark's request (``infergate bench --load raw --model mlp --features
  64``): FP32 [1, 64] in raw contents against the MLP's signature (INPUT FP32 [-1, 64] -> OUTPUT
  FP32 [-1, 2], batched, no limit of its own); the answer is FP32 [1, 2];
- ``mlp-params``: the same with one request parameter (a sticky key);
- ``bytes``: BYTES [4] in raw contents (length-prefixed) into a [-1] BYTES input;
- ``typed``: FP32 [1, 16] in ``fp32_contents`` instead of raw;
- ``two-inputs``: FP32 [1, 64] and INT64 [1, 1], raw, and both outputs requested by name;
- ``entities``: 64 INT64 entity ids (the online-features signature, whose input also accepts
  INT64/BYTES ids) with ``max_batch_size`` 64.

Read differences between commits on the same machine, not absolute numbers. ``--before
PATH/gateway/converters.py`` loads a second copy of the converters (another checkout's) and times
both in this process, repeat by repeat in turn, so that a busy machine slows both alike:

    python -m infergate.benchmarks.decode_cost --before /work/main/gateway/converters.py
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType

import numpy as np

from infergate.backends.base import ModelSignature, TensorSpec
from infergate.backends.datatypes import encode_bytes
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway import converters

ENTITY_ALTERNATIVES = (("BYTES", (-1, 1)), ("INT64", (-1,)), ("INT64", (-1, 1)))  # as gateway/features.py


def _mlp_signature() -> ModelSignature:
    return ModelSignature(
        inputs=(TensorSpec("INPUT", "FP32", (-1, 64)),),
        outputs=(TensorSpec("OUTPUT", "FP32", (-1, 2)),),
        batched=True,
        platform="onnxruntime_onnx",
    )


def _row(width: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(1, width)).astype(np.float32)


def cases() -> dict[str, tuple[bytes, ModelSignature, int, dict[str, np.ndarray]]]:
    """name -> (request wire bytes, signature, max_batch_size, outputs to encode)."""
    out: dict[str, tuple[bytes, ModelSignature, int, dict[str, np.ndarray]]] = {}
    answer = {"OUTPUT": np.zeros((1, 2), np.float32)}

    mlp = pb.ModelInferRequest(
        model_name="mlp",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[_row(64).tobytes()],
    )
    out["mlp"] = (mlp.SerializeToString(), _mlp_signature(), 0, answer)

    params = pb.ModelInferRequest()
    params.CopyFrom(mlp)
    params.parameters["user_id"].string_param = "user-42"
    out["mlp-params"] = (params.SerializeToString(), _mlp_signature(), 0, answer)

    items = np.array([b"alpha", b"", "héllo".encode(), b"x" * 40], dtype=np.object_)
    text = pb.ModelInferRequest(
        model_name="echo",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[4])],
        raw_input_contents=[encode_bytes(items)],
    )
    text_sig = ModelSignature(
        inputs=(TensorSpec("TEXT", "BYTES", (-1,)),), outputs=(TensorSpec("ECHO", "BYTES", (-1,)),), batched=True
    )
    out["bytes"] = (text.SerializeToString(), text_sig, 0, {"ECHO": items})

    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="X", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend(_row(16).ravel().tolist())
    typed_sig = ModelSignature(
        inputs=(TensorSpec("X", "FP32", (-1, 16)),), outputs=(TensorSpec("Y", "FP32", (-1, 2)),), batched=True
    )
    out["typed"] = (typed.SerializeToString(), typed_sig, 0, {"Y": np.zeros((1, 2), np.float32)})

    two = pb.ModelInferRequest(
        model_name="two",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="A", datatype="FP32", shape=[1, 64]),
            pb.ModelInferRequest.InferInputTensor(name="B", datatype="INT64", shape=[1, 1]),
        ],
        outputs=[
            pb.ModelInferRequest.InferRequestedOutputTensor(name="P"),
            pb.ModelInferRequest.InferRequestedOutputTensor(name="Q"),
        ],
        raw_input_contents=[_row(64).tobytes(), np.array([[7]], np.int64).tobytes()],
    )
    two_sig = ModelSignature(
        inputs=(TensorSpec("A", "FP32", (-1, 64)), TensorSpec("B", "INT64", (-1, 1))),
        outputs=(TensorSpec("P", "FP32", (-1, 2)), TensorSpec("Q", "INT64", (-1,))),
        batched=True,
    )
    out["two-inputs"] = (
        two.SerializeToString(),
        two_sig,
        0,
        {"P": np.zeros((1, 2), np.float32), "Q": np.zeros(1, np.int64)},
    )

    ids = pb.ModelInferRequest(
        model_name="fraud",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="ENTITY", datatype="INT64", shape=[64])],
        raw_input_contents=[np.arange(64, dtype=np.int64).tobytes()],
    )
    ids_sig = ModelSignature(
        inputs=(TensorSpec("ENTITY", "BYTES", (-1,), accepts=ENTITY_ALTERNATIVES),),
        outputs=(TensorSpec("OUTPUT", "FP32", (-1, 2)),),
        batched=True,
    )
    out["entities"] = (ids.SerializeToString(), ids_sig, 64, {"OUTPUT": np.zeros((64, 2), np.float32)})
    return out


def _per_call_us(run: Callable[[int], None], calls: int) -> float:
    gc.collect()
    start = time.perf_counter_ns()
    run(calls)
    return (time.perf_counter_ns() - start) / calls / 1000


def load_converters(path: str) -> ModuleType:
    """A second copy of a converters module, from another checkout's file."""
    spec = importlib.util.spec_from_file_location("decode_cost_before", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def measure(
    calls: int, repeats: int, modules: dict[str, ModuleType], only: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """case -> "<module> decode_us" / "<module> encode_us": medians of ``repeats`` loops each."""
    results: dict[str, dict[str, float]] = {}
    for name, (wire, signature, max_batch, outputs) in cases().items():
        if only and name not in only:
            continue
        samples: dict[str, list[float]] = {}
        for label, module in modules.items():
            module.decode_infer_request(pb.ModelInferRequest.FromString(wire), signature, max_batch)  # valid, warm
        for _ in range(repeats):
            for label, module in modules.items():
                decode, encode = module.decode_infer_request, module.encode_infer_response
                # Fresh messages each loop, parsed outside the clock.
                messages = [pb.ModelInferRequest.FromString(wire) for _ in range(calls)]

                def decoding(n: int) -> None:
                    for message in messages:
                        decode(message, signature, max_batch)

                def encoding(n: int) -> None:
                    for _ in range(n):
                        encode("mlp", "", outputs, "v1")

                samples.setdefault(f"{label} decode_us", []).append(_per_call_us(decoding, calls))
                samples.setdefault(f"{label} encode_us", []).append(_per_call_us(encoding, calls))
        results[name] = {key: round(statistics.median(values), 3) for key, values in samples.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per case (median reported)")
    parser.add_argument("--case", action="append", help="only these cases (repeatable)")
    parser.add_argument("--before", help="another checkout's gateway/converters.py, timed in turn with this one")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    modules = {"after": converters} if args.before else {"this": converters}
    if args.before:
        modules = {"before": load_converters(args.before), **modules}
    results = measure(args.calls, args.repeats, modules, args.case)
    columns = [f"{label} {kind}" for label in modules for kind in ("decode_us", "encode_us")]
    print(f"{'case':<12} " + " ".join(f"{column:>18}" for column in columns))
    for name, row in results.items():
        print(f"{name:<12} " + " ".join(f"{row[column]:>18.2f}" for column in columns))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
