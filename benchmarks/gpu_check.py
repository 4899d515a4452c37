"""The GPU paths, end to end, in one short run: ``python -m infergate.benchmarks.gpu_check``.

Starts a gateway whose variant runs ONNX Runtime with ``CUDAExecutionProvider`` (configuration
only), checks that the session really runs on CUDA, calls it with unmodified tritonclient and
compares the answers with the numpy reference, then takes a short benchmark beside the CPU
provider in the same run. Needs onnxruntime-gpu and a CUDA device (benchmarks/gpu_check.sh
installs it); exits 1 with a message when the CUDA provider is not there.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infergate.benchmarks.loadgen import run_load, single_row_inputs
from infergate.gateway.config import parse_config
from infergate.gateway.demo_models import LinearClassifier
from infergate.gateway.server import Gateway


def _config(path: Path, providers: list[str]) -> dict:
    return {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": ""},
        "backends": {"onnx": {"kind": "onnx", "providers": providers}},
        "models": {
            "classifier": {
                "batching": {"max_batch_size": 64, "max_delay_us": 500},
                "variants": {"v1": {"backend": "onnx", "path": str(path), "weight": 1}},
            }
        },
    }


async def _check(providers: list[str], model: LinearClassifier, path: Path) -> dict:
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import InferInput

    gateway = Gateway(parse_config(_config(path, providers)))
    await gateway.start()
    try:
        backend = gateway.backends["onnx"]
        used = backend.session_providers(str(path))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.port}")
        x = np.random.default_rng(0).normal(size=(8, model.features)).astype(np.float32)
        tensor = InferInput("INPUT", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        probs = (await client.infer("classifier", [tensor])).as_numpy("PROBS")
        await client.close()
        correct = bool(np.allclose(probs, model.reference(x)["PROBS"], atol=1e-4))
        load = await run_load(f"127.0.0.1:{gateway.port}", "classifier", 64, 10.0, single_row_inputs(model.features),
                              target=providers[0])
        return {"providers": used, "correct": correct, **load.row()}
    finally:
        await gateway.stop(1.0)


async def main() -> int:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"CUDAExecutionProvider not available (have {ort.get_available_providers()}); install onnxruntime-gpu on a CUDA machine")
        return 1
    model = LinearClassifier.random(features=256, classes=16, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(Path(tmp) / "classifier.onnx")
        gpu = await _check(["CUDAExecutionProvider", "CPUExecutionProvider"], model, path)
        cpu = await _check(["CPUExecutionProvider"], model, path)
    print(json.dumps({"gpu": gpu, "cpu": cpu, "rps_ratio_gpu_over_cpu": round(gpu["rps"] / max(cpu["rps"], 1e-9), 3)}, indent=2))
    ok = gpu["providers"][0] == "CUDAExecutionProvider" and gpu["correct"] and cpu["correct"] and gpu["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
