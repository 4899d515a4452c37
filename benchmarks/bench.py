"""``infergate bench``: drive targets at several load levels, side by side, and write the results.

Targets are running servers (``--target NAME=HOST:PORT``) or the servers of a scenario the command
starts itself in processes of its own (``--scenario serving``). The load generator
(``benchmarks.loadgen.run_load``, unmodified ``tritonclient.grpc.aio``) runs in this process,
never in a server's. Targets are interleaved at every level (level 1: A, B; level 2: A, B; ...)
so that whatever else the machine is doing falls on all of them alike; compare targets by the
ratios of one run, not by absolute numbers across runs.

Writes ``OUT/results.json`` (machine, date, command, one row per target and level, ratios to the
baseline target), ``OUT/report.md`` and ``OUT/latency.png``. Exits 1 when a run saw errors or
served nothing, 2 on bad arguments.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

DEFAULT_BASELINE = "ceiling"


@dataclass(frozen=True)
class Target:
    """A server to drive: ``name`` in the results, ``url`` host:port, ``model`` the name to call.

    ``compare_to`` names another target this one is also compared with (besides the baseline), such
    as the backend it fronts.
    """

    name: str
    url: str
    model: str
    compare_to: str = ""


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` callers, at ``rate`` requests/s in total (0: closed loop)."""

    concurrency: int
    rate: float


def parse_target(text: str, model: str) -> Target:
    name, sep, url = text.partition("=")
    host, colon, port = url.rpartition(":")
    if not sep or not name or not colon or not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r}: expected NAME=HOST:PORT", param_hint="--target")
    return Target(name, url, model)


def parse_numbers(text: str, kind: type, option: str, minimum: float) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=option) from None
    if not values or any(v < minimum for v in values):
        raise typer.BadParameter(f"{text!r}: expected numbers >= {minimum}", param_hint=option)
    return values


def tls_kwargs(ca_file: Path | None, cert_file: Path | None, key_file: Path | None, scenario: str) -> dict | None:
    """tritonclient's TLS arguments for the TLS options (None: plaintext); bad options are usage errors."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if scenario:
        raise typer.BadParameter("TLS options are for --target servers; a scenario's servers are plaintext", param_hint="--ca-file")
    from infergate.gateway.tls import TlsOptionsError, client_tls

    try:
        tls = client_tls(ca_file, cert_file, key_file)
    except TlsOptionsError as exc:
        raise typer.BadParameter(str(exc)) from None
    return tls.tritonclient_kwargs() if tls else None


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def source_revision() -> str:
    """The checkout's commit, with ``-dirty`` when the working tree differs from it; empty outside git."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


async def measure(
    targets: list[Target],
    levels: list[Level],
    duration_s: float,
    warmup_s: float,
    headers: dict[str, str] | None,
    features: int,
    input_name: str,
    ssl: dict | None = None,
    echo=print,
    rounds: int = 1,
) -> list[list[dict]]:
    """Every target at every level, targets interleaved within a level; one list of rows per round.

    Each round rotates the order of the targets, so that over rounds every target runs first,
    second... equally often: on a shared machine the position in a level matters.
    """
    per_round = []
    for round_index in range(rounds):
        shift = round_index % len(targets)
        order = targets[shift:] + targets[:shift]
        if rounds > 1:
            echo(f"round {round_index + 1} of {rounds}: {', '.join(t.name for t in order)}")
        per_round.append(
            await _measure_round(order, levels, duration_s, warmup_s, headers, features, input_name, ssl, echo)
        )
    return per_round


async def _measure_round(targets, levels, duration_s, warmup_s, headers, features, input_name, ssl, echo) -> list[dict]:
    from infergate.benchmarks.loadgen import run_load, single_row_inputs

    rows = []
    for level in levels:
        for target in targets:
            result = await run_load(
                target.url,
                target.model,
                level.concurrency,
                duration_s,
                single_row_inputs(features, input_name),
                target=target.name,
                rate=level.rate,
                warmup_s=warmup_s,
                headers=headers,
                ssl=ssl,
            )
            echo(
                f"{target.name:>16} c={level.concurrency:<4} rate={level.rate:g}: {result.rps:9.1f} req/s "
                f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms errors {result.errors}"
            )
            rows.append(result.row())
    return rows


def comparisons(targets: list[Target], baseline: str) -> list[tuple[str, str]]:
    """(target, reference) pairs: every target against the baseline, then each against its ``compare_to``."""
    names = {t.name for t in targets}
    pairs = [(t.name, baseline) for t in targets if t.name != baseline and baseline in names]
    pairs += [(t.name, t.compare_to) for t in targets if t.compare_to in names and t.compare_to != baseline]
    return pairs


def ratios(rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """For each pair and level, target over reference: requests/s, p50 and p99 ratios."""
    by_key = {(r["target"], r["concurrency"], r["rate"]): r for r in rows}
    out = []
    for name, reference in pairs:
        for row in rows:
            ref = by_key.get((reference, row["concurrency"], row["rate"]))
            if row["target"] != name or ref is None:
                continue
            out.append({
                "target": name,
                "baseline": reference,
                "concurrency": row["concurrency"],
                "rate": row["rate"],
                "rps_ratio": _ratio(row["rps"], ref["rps"]),
                "p50_ratio": _ratio(row["p50_ms"], ref["p50_ms"]),
                "p99_ratio": _ratio(row["p99_ms"], ref["p99_ms"]),
            })
    return out


def _ratio(value: float, reference: float) -> float | None:
    return round(value / reference, 3) if reference else None


_MEDIAN_FIELDS = ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms")
_RATIO_FIELDS = ("rps_ratio", "p50_ratio", "p99_ratio")


def combine_rounds(per_round: list[list[dict]], pairs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """One row per target and level (medians over rounds, errors summed) and the median of the
    per-round ratios: each ratio is taken inside one round, where both sides shared the machine."""
    keyed: dict[tuple, list[dict]] = {}
    for rows in per_round:
        for row in rows:
            keyed.setdefault((row["target"], row["concurrency"], row["rate"]), []).append(row)
    combined = []
    for runs in keyed.values():
        row = dict(runs[0])
        for field in _MEDIAN_FIELDS:
            row[field] = round(statistics.median(r[field] for r in runs), 3)
        row["errors"] = sum(r["errors"] for r in runs)
        codes: dict[str, int] = {}
        for r in runs:
            for code, count in r["error_codes"].items():
                codes[code] = codes.get(code, 0) + count
        row["error_codes"] = codes
        row["requests"] = sum(r.get("requests", 0) for r in runs)
        row["rounds"] = len(runs)
        row["rps_by_round"] = [r["rps"] for r in runs]
        combined.append(row)
    combined.sort(key=lambda r: (r["concurrency"], r["rate"]))
    ratio_runs: dict[tuple, list[dict]] = {}
    for rows in per_round:
        for ratio in ratios(rows, pairs):
            ratio_runs.setdefault((ratio["target"], ratio["baseline"], ratio["concurrency"], ratio["rate"]), []).append(ratio)
    compared = []
    for runs in ratio_runs.values():
        ratio = dict(runs[0])
        for field in _RATIO_FIELDS:
            values = [r[field] for r in runs if r[field] is not None]
            ratio[field] = round(statistics.median(values), 3) if values else None
        ratio["rps_ratio_by_round"] = [r["rps_ratio"] for r in runs]
        compared.append(ratio)
    compared.sort(key=lambda r: (r["concurrency"], r["rate"]))
    return combined, compared


def bench_command(
    target: list[str] = typer.Option([], "--target", help="NAME=HOST:PORT of a running server (repeatable)."),
    scenario: str = typer.Option("", help="Start the servers of a scenario instead: 'serving'."),
    with_triton: bool = typer.Option(False, "--with-triton", help="serving: add Triton direct and gateway over Triton."),
    model: str = typer.Option("classifier", help="Model called on --target servers."),
    concurrency: str = typer.Option("1,32", help="Concurrent callers per level, comma-separated."),
    rate: str = typer.Option("0", help="Total requests/s per level, comma-separated; 0 = closed loop."),
    duration_s: float = typer.Option(8.0, "--duration-s", min=0.1, help="Measured seconds per target and level."),
    warmup_s: float = typer.Option(1.0, "--warmup-s", min=0.0, help="Unmeasured seconds before each run."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Directory for results.json, report.md, latency.png."),
    token: str = typer.Option("", envvar="INFERGATE_TOKEN", help="Sent as 'authorization: Bearer TOKEN'."),
    baseline: str = typer.Option(DEFAULT_BASELINE, help="Target the ratios are taken against."),
    features: int = typer.Option(16, min=1, help="Each request is one FP32 row of this many values..."),
    input_name: str = typer.Option("INPUT", help="...in the input of this name."),
    machine: str = typer.Option("", help="Machine description for the report (default: detected)."),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", help="TLS to --target servers: the CA that signed them."),
    cert_file: Optional[Path] = typer.Option(None, "--cert-file", help="Client certificate for mutual TLS..."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="...and its private key."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Repeat every level this often, rotating the target order; report medians."),
) -> None:
    """Measure requests/s and latency percentiles of targets side by side; write results, report, plot."""
    targets = [parse_target(t, model) for t in target]
    if bool(targets) == bool(scenario):
        raise typer.BadParameter("give either --target (one or more) or --scenario", param_hint="--target/--scenario")
    levels = [
        Level(c, r)
        for c in parse_numbers(concurrency, int, "--concurrency", 1)
        for r in parse_numbers(rate, float, "--rate", 0)
    ]
    headers = {"authorization": f"Bearer {token}"} if token else None
    ssl = tls_kwargs(ca_file, cert_file, key_file, scenario)
    meta = {
        "machine": machine or machine_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["infergate", *sys.argv[1:]]),
        "revision": source_revision(),
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rounds": rounds,
    }

    def run(targets: list[Target]) -> tuple[list[dict], list[dict]]:
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise typer.BadParameter(f"target names repeat: {names}", param_hint="--target")
        per_round = asyncio.run(
            measure(targets, levels, duration_s, warmup_s, headers, features, input_name, ssl, typer.echo, rounds)
        )
        return combine_rounds(per_round, comparisons(targets, baseline))

    if scenario:
        from infergate.benchmarks.scenarios import SCENARIOS, start_scenario

        if scenario not in SCENARIOS:
            raise typer.BadParameter(f"{scenario!r}: known scenarios are {', '.join(SCENARIOS)}", param_hint="--scenario")
        with tempfile.TemporaryDirectory(prefix="infergate-bench-") as workdir:
            typer.echo(f"starting scenario {scenario}")
            try:
                with start_scenario(scenario, Path(workdir), with_triton) as started:
                    rows, compared = run(started)
            except RuntimeError as exc:  # a server did not start; the message carries its output
                typer.echo(f"infergate bench: {exc}", err=True)
                raise typer.Exit(1) from None
    else:
        rows, compared = run(targets)

    from infergate.benchmarks.report import write_all

    paths = write_all(out, meta, rows, compared)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
    failed = [r["target"] for r in rows if r["errors"] or not r["rps"]]
    if failed:
        typer.echo(f"infergate bench: errors or no answers from: {', '.join(sorted(set(failed)))}", err=True)
        raise typer.Exit(1)
