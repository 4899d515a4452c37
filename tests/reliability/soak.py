"""The reliability soak: a real gateway at about 70 % of its capacity, valid and invalid calls mixed.

    python -m tests.reliability.soak --minutes 10            # gateway on the first half of the CPUs, load on the rest
    python -m tests.reliability.soak --minutes 10 --server-cpus 0 --client-cpus 1

Starts a local redis-server and ``infergate serve`` over ONNX Runtime (the test models), measures
the gateway's capacity for 10 s with closed-loop callers, then calls at 70 % of it for the given
time. Each valid call carries its own random input and its answer is checked against the numpy
reference of the same weights (a mixed-up answer is counted); one call in five is invalid (wrong
shape, unknown model, bytes that do not parse) and must get its designed status. RSS is sampled
every second; growth is measured from the end of warm-up (the first fifth of the run). Prints one
JSON line and exits 1 when RSS grew by 10 % or more, an answer was mixed up, or a status was not
the designed one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.cpus import CpuSetError, check_disjoint, children_pinned_to, default_split, parse_cpu_list, usable_cpus
from infergate.gateway._proto.inference import grpc_service_pb2 as pb
from infergate.gateway.local_redis import LocalRedis
from tests.reliability.conftest import rss_bytes
from tests.support.models import FEATURES, classifier, onnx_config, write_models
from tests.support.processes import GatewayProcess

CALLERS = 8
CAPACITY_PROBE_S = 10.0
LOAD_SHARE = 0.7
RSS_GROWTH_LIMIT = 0.10
EXPECTED = {"valid": {"OK"}, "shape": {"INVALID_ARGUMENT"}, "model": {"NOT_FOUND"}, "bytes": {"INVALID_ARGUMENT"}}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.mixed_up = 0
        self.unexpected: dict[str, int] = {}
        self.codes: dict[str, int] = {}

    def add(self, kind: str, code: str, mixed_up: bool = False) -> None:
        with self.lock:
            self.calls += 1
            self.codes[code] = self.codes.get(code, 0) + 1
            if mixed_up:
                self.mixed_up += 1
            if code not in EXPECTED[kind]:
                key = f"{kind}:{code}"
                self.unexpected[key] = self.unexpected.get(key, 0) + 1


def one_call(channel: grpc.Channel, rng: np.random.Generator, n: int, reference, tally: Tally) -> None:
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    kind = ("valid", "valid", "valid", "valid", "shape", "model", "bytes")[n % 7] if n % 5 == 0 else "valid"
    x = rng.normal(size=(1 + n % 4, FEATURES)).astype("<f4")
    request = pb.ModelInferRequest(model_name="linear" if kind != "model" else "no-such-model", id=str(n))
    request.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape) if kind != "shape" else [x.shape[0], FEATURES + 1])
    request.raw_input_contents.append(x.tobytes())
    payload = request.SerializeToString() if kind != "bytes" else b"\x0a\x05ab"
    try:
        raw = infer(payload, timeout=10)
    except grpc.RpcError as exc:
        tally.add(kind, exc.code().name)
        return
    answer = pb.ModelInferResponse.FromString(raw)
    index = [o.name for o in answer.outputs].index("SCORES")
    scores = np.frombuffer(answer.raw_output_contents[index], dtype="<f4").reshape(x.shape[0], -1)
    mixed_up = answer.id != str(n) or not np.allclose(scores, reference(x)["SCORES"], atol=1e-4)
    tally.add(kind, "OK", mixed_up)


def run_callers(url: str, seconds: float, rate_per_s: float | None, tally: Tally) -> None:
    reference = classifier(1).reference
    stop_at = time.monotonic() + seconds

    def caller(index: int) -> None:
        rng = np.random.default_rng(index)
        interval = CALLERS / rate_per_s if rate_per_s else 0.0
        next_at = time.monotonic()
        n = index
        with grpc.insecure_channel(url) as channel:
            while time.monotonic() < stop_at:
                one_call(channel, rng, n, reference, tally)
                n += CALLERS
                if interval:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--server-cpus", help="CPUs of the gateway (kernel list, e.g. 0); default: the first half")
    parser.add_argument("--client-cpus", help="CPUs of the load (e.g. 1); default: the rest")
    parser.add_argument("--no-pin", action="store_true", help="let gateway and load float over every CPU")
    args = parser.parse_args(argv)
    server_cpus = client_cpus = None
    if not args.no_pin:
        split = default_split(usable_cpus())
        try:
            server_cpus = parse_cpu_list(args.server_cpus) if args.server_cpus else (split[0] if split else None)
            client_cpus = parse_cpu_list(args.client_cpus) if args.client_cpus else (split[1] if split else None)
            if server_cpus is not None and client_cpus is not None:
                check_disjoint(server_cpus, client_cpus, usable_cpus())
        except CpuSetError as exc:
            parser.error(str(exc))
    seconds = args.minutes * 60
    workdir = Path(tempfile.mkdtemp(prefix="infergate-soak-"))
    with children_pinned_to(server_cpus):  # Redis beside the gateway, apart from the load
        redis = LocalRedis().start()
    gateway = None
    try:
        config = dict(onnx_config(write_models(workdir / "models")), redis={"url": redis.url})
        with children_pinned_to(server_cpus):  # the gateway and its threads, from their first instruction
            gateway = GatewayProcess(config, workdir, name="soak-gateway").start()
        if client_cpus is not None:
            os.sched_setaffinity(0, client_cpus)  # the load: this process's caller threads
        pid = gateway.process.pid
        probe = Tally()
        run_callers(gateway.url, CAPACITY_PROBE_S, None, probe)
        capacity = probe.calls / CAPACITY_PROBE_S
        rate = LOAD_SHARE * capacity

        tally = Tally()
        samples: list[tuple[float, int]] = []
        sampling = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not sampling.is_set():
                samples.append((time.monotonic() - started, rss_bytes(pid)))
                time.sleep(1.0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        run_callers(gateway.url, seconds, rate, tally)
        took = time.monotonic() - started
        sampling.set()
        sampler.join()
        warm = [rss for at, rss in samples if at >= seconds / 5]
        growth = (warm[-1] - warm[0]) / warm[0] if len(warm) >= 2 else 0.0
        result = {
            "minutes": args.minutes,
            "server_cpus": sorted(server_cpus) if server_cpus else "any",
            "client_cpus": sorted(client_cpus) if client_cpus else "any",
            "capacity_rps": round(capacity, 1),
            "target_rps": round(rate, 1),
            "achieved_rps": round(tally.calls / took, 1),
            "calls": tally.calls,
            "codes": tally.codes,
            "mixed_up_answers": tally.mixed_up,
            "unexpected_statuses": tally.unexpected,
            "rss_after_warmup_mib": round(warm[0] / 2**20, 1) if warm else None,
            "rss_end_mib": round(warm[-1] / 2**20, 1) if warm else None,
            "rss_growth_after_warmup": round(growth, 4),
        }
        print(json.dumps(result), flush=True)
        ok = growth < RSS_GROWTH_LIMIT and tally.mixed_up == 0 and not tally.unexpected
        return 0 if ok else 1
    finally:
        if gateway is not None:
            gateway.stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
