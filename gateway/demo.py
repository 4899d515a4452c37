"""``infergate demo``: the whole local stack on a bundled model, then sample calls.

Builds two small ONNX classifiers in code (variants v1 and v2 of model ``classifier``, weights
90/10), starts a gateway on them with ONNX Runtime on the CPU, uses Redis when a URL is given or a
local ``redis-server`` can be started (and says so plainly when neither), then calls the gateway
with the unmodified ``tritonclient.grpc.aio`` client and prints each answer and the variant that
served it, checked against a numpy reference of the same weights.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from infergate.gateway.config import parse_config
from infergate.gateway.demo_models import LinearClassifier
from infergate.gateway.local_redis import LocalRedis
from infergate.gateway.redaction import redact_url
from infergate.gateway.server import Gateway, StartupError

SAMPLE_CALLS = 12
STARTER_CONFIG = "starter.yaml"
"""The commented starter config (package data; ``examples/infergate.yaml`` is the same file)."""


class ExportError(Exception):
    """The export would overwrite something the user changed; the message says what."""


def starter_config_text() -> str:
    from importlib.resources import files

    return files("infergate.gateway").joinpath(STARTER_CONFIG).read_text(encoding="utf-8")


def export_demo(directory: Path, force: bool = False) -> list[Path]:
    """Write the demo's two models (``models/classifier_v1.onnx``, ``_v2``) and the commented
    ``infergate.yaml`` that serves them into ``directory``; the paths written.

    An existing ``infergate.yaml`` that differs from the starter is kept unless ``force``.
    """
    config = directory / "infergate.yaml"
    text = starter_config_text()
    if config.exists() and not force and config.read_text(encoding="utf-8") != text:
        raise ExportError(f"{config} exists and differs from the starter config; keep it, or --force to overwrite")
    (directory / "models").mkdir(parents=True, exist_ok=True)
    written = [
        LinearClassifier.random(seed=seed).save(directory / "models" / f"classifier_v{seed}.onnx") for seed in (1, 2)
    ]
    config.write_text(text, encoding="utf-8")
    return [config, *written]


def demo_config(model_dir: Path, port: int, redis_url: str) -> dict:
    """The embedded default config: one model, two ONNX variants on the CPU."""
    return {
        "server": {"listen": f"127.0.0.1:{port}", "metrics_listen": ""},
        "redis": {"url": redis_url},
        "backends": {"onnx_cpu": {"kind": "onnx", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}},
        "models": {
            "classifier": {
                "batching": {"max_batch_size": 32, "max_delay_us": 500},
                "variants": {
                    "v1": {"backend": "onnx_cpu", "path": str(model_dir / "classifier_v1.onnx"), "weight": 90},
                    "v2": {"backend": "onnx_cpu", "path": str(model_dir / "classifier_v2.onnx"), "weight": 10},
                },
            }
        },
    }


async def run_demo(redis_url: str = "", serve_after: bool = False, port: int = 0) -> int:
    """Run the demo; 0 when every answer matched numpy. SIGTERM or Ctrl-C stop it cleanly."""
    console = Console()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    redis: LocalRedis | None = None
    try:
        if not redis_url:
            if LocalRedis.available():
                redis = LocalRedis().start()
                redis_url = redis.url
                console.print(f"Redis: started a local redis-server at {redis_url}")
            else:
                console.print("Redis: no URL given and no redis-server installed; running without Redis "
                              "(routes come from the config only, no shared state).")
        else:
            console.print(f"Redis: using {redact_url(redis_url)}")
        demo = asyncio.ensure_future(_run(console, redis_url, serve_after, port))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({demo, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not demo.done():  # a signal: let the demo's own cleanup run (gateway stop, temp files)
            demo.cancel()
            await asyncio.gather(demo, return_exceptions=True)
            console.print("stopped")
            return 0 if serve_after else 1
        stopped.cancel()
        return demo.result()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if redis is not None:
            redis.stop()


async def _run(console: Console, redis_url: str, serve_after: bool, port: int) -> int:
    with tempfile.TemporaryDirectory(prefix="infergate-demo-") as tmp:
        models = {
            "v1": LinearClassifier.random(seed=1),
            "v2": LinearClassifier.random(seed=2),
        }
        for name, model in models.items():
            model.save(Path(tmp) / f"classifier_{name}.onnx")
        gateway = Gateway(parse_config(demo_config(Path(tmp), port, redis_url)))
        try:
            try:
                await gateway.start()
            except StartupError as exc:
                console.print(f"[red]cannot start the gateway: {exc}[/red]")
                return 1
            console.print(f"Gateway: listening on 127.0.0.1:{gateway.port} (model 'classifier', variants v1=90 v2=10)")
            url = f"127.0.0.1:{gateway.port}"
            rng = np.random.default_rng(7)
            await _print_metadata(console, url)
            ok = await _sample_calls(console, url, models, "Sample calls through the gateway (tritonclient.grpc.aio)", SAMPLE_CALLS, rng)
            if redis_url:
                await _shift_traffic(console, url)
                ok &= await _sample_calls(console, url, models, "After the weight change", 4, rng)
            if serve_after:
                console.print("Serving until Ctrl-C or SIGTERM. Try: python -c \"import tritonclient.grpc as g; "
                              f"print(g.InferenceServerClient('127.0.0.1:{gateway.port}').get_model_metadata('classifier'))\"")
                await asyncio.Event().wait()
            return 0 if ok else 1
        finally:
            await gateway.stop(1.0)


async def _sample_calls(
    console: Console, url: str, models: dict[str, LinearClassifier], title: str, count: int, rng: np.random.Generator
) -> bool:
    """``count`` calls with tritonclient.grpc.aio, printed as a table; True when all match numpy."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import InferInput, InferRequestedOutput

    client = grpcclient.InferenceServerClient(url)
    try:
        table = Table(title=title)
        for column in ("call", "variant", "top class", "probabilities", "matches numpy"):
            table.add_column(column)
        all_match = True
        for call in range(count):
            row = rng.normal(size=(1, 16)).astype(np.float32)
            tensor = InferInput("INPUT", list(row.shape), "FP32")
            tensor.set_data_from_numpy(row)
            result = await client.infer(
                "classifier", [tensor], outputs=[InferRequestedOutput("PROBS")], request_id=str(call)
            )
            variant = result.get_response().parameters["variant"].string_param
            probs = result.as_numpy("PROBS")
            expected = models[variant].reference(row)["PROBS"]
            match = bool(np.allclose(probs, expected, atol=1e-5))
            all_match &= match
            table.add_row(str(call), variant, str(int(probs.argmax())), np.array2string(probs[0], precision=3), "yes" if match else "NO")
        console.print(table)
        return all_match
    finally:
        await client.close()


async def _print_metadata(console: Console, url: str) -> None:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        metadata = await client.get_model_metadata("classifier", as_json=True)
        console.print(f"Model metadata: inputs {[(i['name'], i['datatype'], i['shape']) for i in metadata['inputs']]}")
    finally:
        await client.close()


async def _shift_traffic(console: Console, url: str) -> None:
    """What an SRE does with ``infergate canary set``: all traffic to v2, through the admin API."""
    import grpc

    from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as admin
    from infergate.gateway._proto.infergate.admin.v1 import admin_pb2_grpc as admin_grpc

    async with grpc.aio.insecure_channel(url) as channel:
        stub = admin_grpc.RoutingAdminStub(channel)
        before = (await stub.GetRoute(admin.GetRouteRequest(model="classifier"))).route
        changed = await stub.SetWeights(
            admin.SetWeightsRequest(
                model="classifier",
                weights={"v1": 0, "v2": 100},
                expected_revision=before.revision,
                reason="demo: send every call to v2",
            )
        )
        console.print(
            f"Admin: SetWeights v1=0 v2=100 at revision {before.revision} -> revision {changed.route.revision} "
            "(stored in Redis and published to every replica; `infergate canary set classifier v1=0 v2=100` does the same)"
        )
        audit = await stub.GetAuditLog(admin.GetAuditLogRequest(model="classifier", limit=1))
        for entry in audit.entries:
            console.print(
                f"Audit: {entry.action} by {entry.subject or 'anonymous'}: {dict(entry.old_weights)} -> "
                f"{dict(entry.new_weights)} ({entry.reason})"
            )
