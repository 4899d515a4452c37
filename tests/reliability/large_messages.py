"""Large messages at once against a real gateway process: codes, peak RSS and RSS afterwards.

    python -m tests.reliability.large_messages --callers 48 --mib 60            # the case of issue 9, item 4
    python -m tests.reliability.large_messages --callers 48 --mib 8 --calls 3   # the largest allowed size
    python -m tests.reliability.large_messages --callers 48 --mib 60 --one-connection

Each caller sends its calls of ``--mib`` MiB (well formed, the wrong number of raw bytes for the
model, so a call that gets through is INVALID_ARGUMENT) on its own connection, or all on one with
``--one-connection``; gateway options go in with ``--server key=value`` (integers). Prints one JSON
line. ``test_memory_budget.py`` asserts on the same measurement.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway._proto.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.reliability.conftest import rss_bytes
from tests.support.models import onnx_config, write_models
from tests.support.processes import GatewayProcess

CLIENT_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


def big_request(tag: int, nbytes: int) -> bytes:
    """Well formed but with the wrong number of raw bytes: decoded, then refused INVALID_ARGUMENT."""
    request = pb.ModelInferRequest(model_name="linear", id=str(tag))
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(bytes([tag % 251]) * nbytes)
    return request.SerializeToString()


@dataclass
class Outcome:
    codes: dict[str, int] = field(default_factory=dict)
    idle_bytes: int = 0
    peak_bytes: int = 0
    after_bytes: int = 0
    took_s: float = 0.0
    small_call_ok: bool = False

    def summary(self) -> dict:
        mib = 1 << 20
        return {"codes": self.codes, "rss_idle_mib": self.idle_bytes // mib, "rss_peak_mib": self.peak_bytes // mib,
                "rss_after_mib": self.after_bytes // mib, "took_s": round(self.took_s, 1),
                "small_call_after_ok": self.small_call_ok}


def flood(gateway: GatewayProcess, callers: int, nbytes: int, calls: int = 1, one_connection: bool = False) -> Outcome:
    """``callers`` threads each send ``calls`` messages of ``nbytes`` at once; RSS sampled every 10 ms."""
    pid = gateway.process.pid
    outcome = Outcome(idle_bytes=rss_bytes(pid))
    outcome.peak_bytes = outcome.idle_bytes
    lock = threading.Lock()
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            outcome.peak_bytes = max(outcome.peak_bytes, rss_bytes(pid))
            time.sleep(0.01)

    shared = grpc.insecure_channel(gateway.url, options=CLIENT_OPTIONS) if one_connection else None
    start = threading.Barrier(callers)

    def caller(index: int) -> None:
        payload = big_request(index, nbytes)
        channel = shared or grpc.insecure_channel(gateway.url, options=CLIENT_OPTIONS)
        try:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            start.wait(60)
            for _ in range(calls):
                try:
                    call(payload, timeout=120)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    outcome.codes[code] = outcome.codes.get(code, 0) + 1
        finally:
            if shared is None:
                channel.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        outcome.took_s = time.monotonic() - started
        time.sleep(1.0)  # what stays resident, not what is being freed
    finally:
        sampling.set()
        sampler.join()
        if shared is not None:
            shared.close()
    outcome.after_bytes = rss_bytes(pid)
    # Afterwards the gateway serves a normal call.
    with grpc.insecure_channel(gateway.url) as channel:
        request = pb.ModelInferRequest(model_name="linear")
        request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(b"\0" * 64)
        outcome.small_call_ok = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10).model_name == "linear"
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=48)
    parser.add_argument("--mib", type=float, default=60)
    parser.add_argument("--calls", type=int, default=1, help="calls per caller, one after another")
    parser.add_argument("--one-connection", action="store_true")
    parser.add_argument("--server", action="append", default=[], metavar="KEY=INT", help="a server.* config value")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment of the gateway")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    server = {key: int(value) for key, value in (item.split("=", 1) for item in args.server)}
    workdir = Path(tempfile.mkdtemp(prefix="infergate-large-"))
    gateway = GatewayProcess(dict(onnx_config(write_models(workdir / "models")), server=server), workdir, name="large", extra_env=env).start()
    try:
        outcome = flood(gateway, args.callers, int(args.mib * (1 << 20)), args.calls, args.one_connection)
    finally:
        gateway.stop()
    print(json.dumps({"callers": args.callers, "mib": args.mib, "calls": args.calls,
                      "one_connection": args.one_connection, "server": server, **outcome.summary()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
