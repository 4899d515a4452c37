"""What auth costs per call, and whether one tenant's flood reaches another tenant.

    python -m infergate.benchmarks.auth_overhead --out benchmarks/results/auth

1. **In process**: the interceptor's warm path (``intercept_service`` for a repeat caller: bearer
   parsing, verified-token cache hit, tenant bucket, context variable); one full RS256
   verification for scale; and
   the CPU of a ``ServerLive`` call (a call that does nothing) on an in-process gateway with auth
   off, on, and refusing, which includes what grpc.aio charges for running an interceptor at all.
2. **Serving path**: two ``infergate serve`` processes on the same ONNX model, ``auth-off``
   (``auth.mode: none``) and ``auth-on`` (JWT from a JWKS file; every call carries the same token,
   so the verified-token cache is warm). Both are driven in ``--rounds`` rounds, alternating which
   goes first; per round and level the figures of the two are divided, and the summary gives the
   medians. Besides requests/s and latency, the server's own CPU time per call (``/proc``) is
   recorded: on a shared machine it is steadier than latency.
3. **Tenants**: tenant B calls at half its limit, alone, then while tenant A offers
   ``--flood-rps`` (20 times its limit, about what one gateway serves here) from a process of its
   own, on a gateway that enforces ``rate_limit_per_tenant_rps`` and on one without limits.

Writes ``OUT/results.json``. Servers run in processes of their own (``tests/support/processes.py``,
so run this from a source checkout), the load generator in this one. Read ratios, not absolute
numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/support lives in the checkout, beside this package
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from infergate.benchmarks.loadgen import run_load, single_row_inputs  # noqa: E402
from infergate.gateway.auth.tokens import mint_token, public_jwks  # noqa: E402
from infergate.gateway.demo_models import LinearClassifier  # noqa: E402
from tests.support.processes import GatewayProcess  # noqa: E402

MODEL = "classifier"
ISSUER = "https://bench.infergate"
AUDIENCE = "infergate"
TENANT_LIMIT_RPS = 50.0


def gateway_config(model_path: Path, auth: dict) -> dict:
    return {
        "server": {"metrics_listen": ""},
        "auth": auth,
        "backends": {"onnx_cpu": {"kind": "onnx", "intra_op_threads": 1}},
        "models": {MODEL: {"variants": {"v1": {"backend": "onnx_cpu", "path": str(model_path), "weight": 100}}}},
    }


def jwt_auth(jwks_path: Path, **extra) -> dict:
    return {"mode": "jwt", "issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"], "jwks_file": str(jwks_path), **extra}


def token_for(key, tenant: str) -> str:
    return mint_token(
        key, algorithm="RS256", issuer=ISSUER, audience=AUDIENCE, subject=f"bench-{tenant}", scopes=["infer:*"],
        ttl_s=3600, kid="bench", claims={"tenant": tenant},
    )


def warm_path_cost_us(key, jwks_path: Path, calls: int = 100_000) -> dict:
    """Microseconds per call of ``AuthInterceptor.intercept_service`` for a repeat caller (with a
    tenant limit, so the bucket is charged too), of the cache lookup alone, and of a full RS256
    verification; no server involved, best of three."""
    from types import SimpleNamespace

    from infergate.gateway.auth import Authenticator, bearer_token
    from infergate.gateway.config import AuthConfig

    async def measure() -> dict:
        auth = Authenticator(AuthConfig(**jwt_auth(jwks_path, rate_limit_per_tenant_rps=1e9, tenant_claim="tenant")))
        await auth.start()
        try:
            metadata = (("user-agent", "bench"), ("authorization", f"Bearer {token_for(key, 'a')}"))
            details = SimpleNamespace(method="/inference.GRPCInferenceService/ModelInfer", invocation_metadata=metadata)
            handler = object()

            async def continuation(_details):
                return handler

            async def per_call_us(step, number: int) -> float:
                best = float("inf")
                for _ in range(3):
                    started = time.process_time()
                    for _ in range(number):
                        await step()
                    best = min(best, (time.process_time() - started) / number * 1e6)
                return best

            async def intercept() -> None:
                assert await auth.interceptor.intercept_service(continuation, details) is handler

            async def lookup() -> None:
                auth.verifier.cached(bearer_token(metadata))

            async def verify() -> None:
                auth.verifier.forget_all()
                await auth.verifier.verify(bearer_token(metadata))

            await verify()
            return {
                "intercept_warm_us": round(await per_call_us(intercept, calls), 2),
                "cache_lookup_us": round(await per_call_us(lookup, calls), 2),
                "full_rs256_verify_us": round(await per_call_us(verify, 1000), 1),
            }
        finally:
            await auth.close()

    return asyncio.run(measure())


async def trivial_call_cpu_us(model_path: Path, jwks_path: Path, token: str, calls: int = 1000, repeats: int = 5) -> dict:
    """CPU (client and server in this process) per ``ServerLive`` call on an in-process gateway with
    auth off, with auth on and a good token, and with auth on and no token: the whole price of auth
    on a call that does nothing else, grpc.aio's interceptor machinery included. Best of
    ``repeats``, gateways alternating."""
    import grpc

    from infergate.gateway._proto.inference import grpc_service_pb2 as pb
    from infergate.gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
    from infergate.gateway.config import parse_config
    from infergate.gateway.server import Gateway

    class PassThrough(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):
            return await continuation(handler_call_details)

    bearer = (("authorization", f"Bearer {token}"),)
    cases = {
        "auth off": ({"mode": "none"}, bearer, ()),
        "auth off, a pass-through interceptor": ({"mode": "none"}, bearer, (PassThrough(),)),
        "auth on, token": (jwt_auth(jwks_path), bearer, ()),
        "auth on, no token (refused)": (jwt_auth(jwks_path), (), ()),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(2):
        for name, (auth, metadata, interceptors) in cases.items():
            raw = gateway_config(model_path, auth)
            raw["server"]["listen"] = "127.0.0.1:0"
            gateway = Gateway(parse_config(raw), interceptors=interceptors)
            await gateway.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                    live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive

                    async def call() -> None:
                        try:
                            await live(pb.ServerLiveRequest(), metadata=metadata)
                        except grpc.aio.AioRpcError:
                            pass

                    for _ in range(200):
                        await call()
                    for _ in range(repeats):
                        started = time.process_time()
                        for _ in range(calls):
                            await call()
                        best[name] = min(best[name], (time.process_time() - started) / calls * 1e6)
            finally:
                await gateway.stop(0)
    return {name: round(value, 1) for name, value in best.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serving_rounds(targets: dict[str, GatewayProcess], token: str, levels: list[int], rounds: int, duration_s: float) -> list[dict]:
    """Every level ``rounds`` times; within a round the targets alternate which goes first."""
    headers = {"authorization": f"Bearer {token}"}  # sent to both: auth-off ignores it
    inputs = single_row_inputs()
    rows = []
    for round_index in range(rounds):
        for concurrency in levels:
            order = list(targets.items())
            if round_index % 2:
                order.reverse()
            for name, process in order:
                assert process.process is not None
                cpu_before = cpu_seconds(process.process.pid)
                result = await run_load(process.url, MODEL, concurrency, duration_s, inputs, target=name, headers=headers, warmup_s=0.5)
                cpu = cpu_seconds(process.process.pid) - cpu_before
                served = max(result.requests - result.errors, 1)
                row = dict(result.row(), round=round_index, server_cpu_us_per_call=round(cpu / served * 1e6, 1))
                print(
                    f"round {round_index} {name:>8} c={concurrency:<3} {result.rps:8.1f} req/s p50 {result.p50_ms:.2f} ms "
                    f"p99 {result.p99_ms:.2f} ms server CPU {row['server_cpu_us_per_call']} us/call errors {result.errors}",
                    flush=True,
                )
                rows.append(row)
    return rows


def summarize(rows: list[dict], baseline: str, target: str) -> list[dict]:
    """Per concurrency: medians over rounds of each target's figures and of the per-round ratios."""
    summary = []
    for concurrency in sorted({r["concurrency"] for r in rows}):
        pairs = [
            (b, t)
            for b in rows
            for t in rows
            if b["target"] == baseline and t["target"] == target and b["round"] == t["round"]
            and b["concurrency"] == t["concurrency"] == concurrency
        ]
        entry: dict = {"concurrency": concurrency, "rounds": len(pairs)}
        for key in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_call"):
            entry[f"{baseline} {key}"] = round(statistics.median(b[key] for b, _ in pairs), 2)
            entry[f"{target} {key}"] = round(statistics.median(t[key] for _, t in pairs), 2)
            entry[f"ratio {key}"] = round(statistics.median(t[key] / b[key] for b, t in pairs if b[key]), 3)
        summary.append(entry)
    return summary


def _flood_main(url: str, token: str, rate: float, duration_s: float, started, results) -> None:
    """Tenant A's load, in a process of its own so that its refusals cost tenant B's client nothing."""
    flood = run_load(
        url, MODEL, 32, duration_s, single_row_inputs(), target="A", rate=rate, headers={"authorization": f"Bearer {token}"}
    )
    started.set()  # imports are done: what follows is the flood itself
    results.put(asyncio.run(flood).row())


def tenant_isolation(limited_url: str, unlimited_url: str, key, flood_rps: float, duration_s: float) -> list[dict]:
    """Tenant B (at half its limit) alone, then while tenant A offers ``flood_rps`` from another
    process, on a gateway that enforces the limit and on one that does not."""
    b_headers = {"authorization": f"Bearer {token_for(key, 'b')}"}

    def tenant_b(url: str, label: str) -> dict:
        load = run_load(url, MODEL, 4, duration_s, single_row_inputs(), target=label, rate=TENANT_LIMIT_RPS / 2, headers=b_headers)
        return asyncio.run(load).row()

    rows = [tenant_b(limited_url, "tenant B alone")]
    context = multiprocessing.get_context("spawn")
    for url, label in ((limited_url, "limit on"), (unlimited_url, "no limit")):
        results, started = context.Queue(), context.Event()
        flood = context.Process(
            target=_flood_main, args=(url, token_for(key, "a"), flood_rps, duration_s + 4, started, results)
        )
        flood.start()
        try:
            started.wait(120)
            time.sleep(1.5)  # the flood's own warm-up
            rows.append(tenant_b(url, f"tenant B, A flooding, {label}"))
            rows.append(dict(results.get(timeout=120), target=f"tenant A flooding, {label}"))
        finally:
            flood.join(30)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-auth"))
    parser.add_argument("--concurrency", default="1,32", help="levels, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration-s", type=float, default=2.0, help="measured seconds per target, level and round")
    parser.add_argument("--flood-rps", type=float, default=1000.0, help="what tenant A offers (its limit is 50/s)")
    parser.add_argument("--machine", default="2-core CPU sandbox, no GPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with tempfile.TemporaryDirectory(prefix="infergate-auth-bench-") as tmp:
        workdir = Path(tmp)
        model_path = LinearClassifier.random(seed=1).save(workdir / f"{MODEL}.onnx")
        jwks_path = workdir / "jwks.json"
        jwks_path.write_text(json.dumps(public_jwks(key, "bench", "RS256")))
        in_process = warm_path_cost_us(key, jwks_path)
        in_process["server_live_cpu_us"] = asyncio.run(trivial_call_cpu_us(model_path, jwks_path, token_for(key, "a")))
        print(f"in process: {in_process}", flush=True)
        limited = jwt_auth(jwks_path, tenant_claim="tenant", rate_limit_per_tenant_rps=TENANT_LIMIT_RPS)
        gateways = {
            "auth-off": GatewayProcess(gateway_config(model_path, {"mode": "none"}), workdir, name="auth-off"),
            "auth-on": GatewayProcess(gateway_config(model_path, jwt_auth(jwks_path)), workdir, name="auth-on"),
            "limited": GatewayProcess(gateway_config(model_path, limited), workdir, name="limited"),
        }
        try:
            for process in gateways.values():
                process.start()
            serving = {name: gateways[name] for name in ("auth-off", "auth-on")}
            rows = asyncio.run(serving_rounds(serving, token_for(key, "a"), levels, args.rounds, args.duration_s))
            tenants = tenant_isolation(
                gateways["limited"].url, gateways["auth-on"].url, key, args.flood_rps, 3 * args.duration_s
            )
        finally:
            for process in gateways.values():
                process.stop()
    summary = summarize(rows, "auth-off", "auth-on")
    results = {
        "machine": args.machine,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "-m", "infergate.benchmarks.auth_overhead", *sys.argv[1:]]),
        "in_process": in_process,
        "summary": summary,
        "tenants": {"limit_rps": TENANT_LIMIT_RPS, "flood_rps": args.flood_rps, "rows": tenants},
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(summary, indent=2))
    for row in tenants:
        print(
            f"{row['target']:>30}: {row['rps']:7.1f} ok/s p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
            f"refused {row['error_codes']}"
        )
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
