"""``infergate bench``: drive targets at several load levels, side by side, and write the results.

Targets are running servers (``--target NAME=HOST:PORT``) or the servers of a scenario the command
starts itself in processes of its own (``--scenario serving``). Targets are interleaved at every
level (level 1: A, B; level 2: A, B; ...) and, with ``--rounds``, their order rotates, so that
whatever else the machine is doing falls on all of them alike; compare targets by the ratios of
one run, not by absolute numbers across runs.

What makes a difference of 5 % visible:

- **Pinning.** The servers a scenario starts run on ``--server-cpus`` and the load on
  ``--client-cpus`` (by default the first half of the usable CPUs and the rest; on 2 CPUs, CPU 0
  and CPU 1). Unpinned, a server and its load generator trade places on the same CPUs and rounds
  spread by about 30 % on a 2-core machine; pinned, by about 5 %.
- **A load generator that is not the bottleneck.** ``--load raw`` (the default) sends one
  pre-serialized ``ModelInferRequest`` through a bytes-in, bytes-out grpc.aio call;
  ``--load-processes N`` spreads the callers over N processes. Each row records how busy the
  busiest load process was; the report warns above 90 %.
- **Cost, not only speed.** For every target whose process id is known (a scenario's servers,
  ``--target-pid NAME=PID``) the server's CPU time per call, from ``/proc/PID/stat`` (the whole
  process tree: workers and children included).

Before measuring, one call goes to every target; a failure stops the run there with its status
code and message. Failed calls during the run are counted by status code and kept out of the
latency figures. Writes ``OUT/results.json`` (machine, date, command, pinning, load average, one
row per target and level, ratios to the baseline), ``OUT/report.md`` and ``OUT/latency.png``.
Exits 1 when a target failed or served nothing, 2 on bad arguments or a missing extra. The
command's options are in ``infergate.gateway.cli.bench``; this module does the measuring.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import typer

DEFAULT_BASELINE = "ceiling"
LOAD_BUSY_WARNING = 0.9
"""A load process busier than this (fraction of one CPU) may be what limits the figures."""
CHECKOUT_REFUSAL = (
    "--scenario starts its servers with helpers that live in a source checkout (tests/support), "
    "and this infergate is installed without one. Run it from a clone of the repository "
    "(git clone ...; pip install -e '.[test,bench]'), or bench servers you started with --target NAME=HOST:PORT."
)


@dataclass(frozen=True)
class Target:
    """A server to drive: ``name`` in the results, ``url`` host:port, ``model`` the name to call.

    ``compare_to`` names another target this one is also compared with (besides the baseline), such
    as the backend it fronts. ``pid`` is the server's process (for its CPU time), ``description``
    says what it is in the report.
    """

    name: str
    url: str
    model: str
    compare_to: str = ""
    pid: int | None = None
    description: str = ""


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` callers, at ``rate`` requests/s in total (0: closed loop)."""

    concurrency: int
    rate: float


@dataclass(frozen=True)
class Pinning:
    """Where servers and load run; None in a field: not pinned."""

    server: frozenset[int] | None
    client: frozenset[int] | None
    note: str = ""

    def describe(self) -> str:
        from infergate.benchmarks.cpus import format_cpu_list

        if self.server is None and self.client is None:
            return "not pinned" + (f" ({self.note})" if self.note else "")
        parts = [
            f"servers on CPU {format_cpu_list(self.server)}" if self.server else "servers not pinned",
            f"load on CPU {format_cpu_list(self.client)}" if self.client else "load not pinned",
        ]
        return ", ".join(parts) + (f" ({self.note})" if self.note else "")


class FirstCallFailed(Exception):
    """A target's first call failed; the message names the target, the status code and the details."""


def parse_target(text: str, model: str) -> Target:
    name, sep, url = text.partition("=")
    host, colon, port = url.rpartition(":")
    if not sep or not name or not colon or not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r}: expected NAME=HOST:PORT", param_hint="--target")
    return Target(name, url, model, description=f"a running server at {url} (--target), model {model!r}")


def parse_target_pids(texts: list[str], targets: list[Target]) -> list[Target]:
    """``NAME=PID`` options applied to the targets; the PID must be a live process."""
    by_name = {t.name: t for t in targets}
    for text in texts:
        name, sep, pid = text.partition("=")
        if not sep or not pid.isdigit():
            raise typer.BadParameter(f"{text!r}: expected NAME=PID", param_hint="--target-pid")
        if name not in by_name:
            raise typer.BadParameter(f"{name!r} is not a --target (targets: {', '.join(by_name)})", param_hint="--target-pid")
        if not Path(f"/proc/{pid}/stat").exists():
            raise typer.BadParameter(f"no process {pid} here (its CPU time is read from /proc)", param_hint="--target-pid")
        by_name[name] = replace(by_name[name], pid=int(pid))
    return [by_name[t.name] for t in targets]


def parse_numbers(text: str, kind: type, option: str, minimum: float) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=option) from None
    if not values or any(v < minimum for v in values):
        raise typer.BadParameter(f"{text!r}: expected numbers >= {minimum}", param_hint=option)
    return values


def resolve_pinning(pin: bool, server_cpus: str, client_cpus: str) -> Pinning:
    """The CPU sets from the options: explicit lists, one list and the rest for the other side, or the default split."""
    from infergate.benchmarks.cpus import CpuSetError, check_disjoint, default_split, parse_cpu_list, usable_cpus

    if not pin:
        if server_cpus or client_cpus:
            raise typer.BadParameter("--no-pin and CPU lists contradict each other", param_hint="--no-pin")
        return Pinning(None, None, "--no-pin")
    if not hasattr(os, "sched_setaffinity"):
        return Pinning(None, None, f"{platform.system()} has no CPU affinity")
    usable = usable_cpus()
    try:
        server = parse_cpu_list(server_cpus) if server_cpus else None
        client = parse_cpu_list(client_cpus) if client_cpus else None
    except CpuSetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--server-cpus/--client-cpus") from None
    if server is None and client is None:
        split = default_split(usable)
        if split is None:
            return Pinning(None, None, "1 usable CPU: nothing to split")
        server, client = split
        note = "default split"
    else:
        server = server if server is not None else (usable - client) or None
        client = client if client is not None else (usable - server) or None
        note = ""
    try:
        check_disjoint(server or frozenset(), client or frozenset(), usable)
    except CpuSetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--server-cpus/--client-cpus") from None
    return Pinning(server, client, note)


def pin_this_process(cpus: frozenset[int]) -> None:
    """Every thread of this process onto ``cpus``; threads and processes it starts later inherit it."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cpus)


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


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


Phase = Callable[[str, float], contextlib.AbstractContextManager]


def console_phase() -> Phase:
    """A progress display for steps that take a while: a spinner with the elapsed time on a terminal,
    one plain line on stderr otherwise (logs stay readable)."""
    from rich.console import Console

    console = Console(stderr=True)

    @contextlib.contextmanager
    def phase(label: str, expected_s: float) -> Iterator[None]:
        if not console.is_terminal:
            typer.echo(f"{label}...", err=True)
            yield
            return
        began = time.monotonic()
        done = threading.Event()
        with console.status(f"{label} (about {expected_s:.0f} s)") as status:

            def tick() -> None:  # the spinner animates itself; the elapsed time is ours to update
                while not done.wait(0.5):
                    status.update(f"{label}: {time.monotonic() - began:.0f} s of about {expected_s:.0f} s")

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
            try:
                yield
            finally:
                done.set()
                ticker.join(1)

    return phase


@dataclass
class LoadSettings:
    """How the load is made: mode, processes, what each request holds, TLS, headers."""

    mode: str
    processes: int
    features: int
    input_name: str
    headers: tuple[tuple[str, str], ...]
    tls: object | None


class LoadRunner:
    """Runs one target at one level with the load spread over ``processes`` processes and reads the
    server's CPU time over the measured window. Use as a context manager (it owns the pool)."""

    START_LEAD_S = 0.3
    """Time between handing out a run and its start, so that every load process starts together."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LoadRunner:
        if self.settings.processes > 1:
            import multiprocessing

            self._pool = ProcessPoolExecutor(self.settings.processes, mp_context=multiprocessing.get_context("spawn"))
            list(self._pool.map(_warm, range(self.settings.processes)))  # imports done before any run
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def spec(self, target: Target):
        from infergate.benchmarks.loadgen import LoadSpec

        s = self.settings
        return LoadSpec(target.url, target.model, s.mode, s.features, s.input_name, s.headers, s.tls)

    async def probe(self, target: Target) -> None:
        from infergate.benchmarks.loadgen import probe

        code, message = await probe(self.spec(target))
        if code != "OK":
            raise FirstCallFailed(f"{target.name} ({target.url}, model {target.model!r}): the first call failed: {code}: {message}")

    async def run(self, target: Target, level: Level, warmup_s: float, duration_s: float) -> dict:
        from infergate.benchmarks.loadgen import run_share, run_share_blocking, summarize

        spec = self.spec(target)
        start = time.monotonic() + self.START_LEAD_S
        shares = _split(level.concurrency, self.settings.processes)
        window = asyncio.ensure_future(_server_cpu(target.pid, start + warmup_s, duration_s))
        if self._pool is None:
            tallies = [await run_share(spec, level.concurrency, level.rate, start, warmup_s, duration_s)]
        else:
            loop = asyncio.get_running_loop()
            futures = [
                loop.run_in_executor(
                    self._pool, run_share_blocking, spec, share, level.rate * share / level.concurrency, start, warmup_s, duration_s
                )
                for share in shares
            ]
            tallies = await asyncio.gather(*futures)
        server_cpu_s = await window
        row = summarize(target.name, level.concurrency, level.rate, duration_s, tallies).row()
        calls = row["requests"]
        row["server_cpu_ms_per_call"] = round(server_cpu_s * 1000 / calls, 4) if server_cpu_s is not None and calls else None
        row["server_cpu_busy"] = round(server_cpu_s / duration_s, 3) if server_cpu_s is not None else None
        row["load_processes"] = len(tallies)
        row["load_cpu_busy"] = round(max(t.cpu_s for t in tallies) / duration_s, 3)
        row["loadavg_1m"] = load_average()
        return row


def _warm(_index: int) -> int:
    import infergate.benchmarks.loadgen  # noqa: F401  (grpc, numpy and the protos, loaded once per process)

    return os.getpid()


def _split(concurrency: int, processes: int) -> list[int]:
    """``concurrency`` callers over at most ``processes`` processes, as evenly as possible."""
    count = min(concurrency, processes)
    return [concurrency // count + (1 if i < concurrency % count else 0) for i in range(count)]


async def _server_cpu(pid: int | None, window_start: float, duration_s: float) -> float | None:
    """CPU seconds the process tree of ``pid`` used between ``window_start`` (monotonic) and the end."""
    if pid is None:
        return None
    from infergate.benchmarks.cpus import tree_cpu_s

    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    try:
        before = await loop.run_in_executor(None, tree_cpu_s, pid)
        await asyncio.sleep(max(0.0, window_start + duration_s - time.monotonic()))
        after = await loop.run_in_executor(None, tree_cpu_s, pid)
    except OSError:
        return None  # the server is gone; its calls fail and the run says so
    return after - before


async def measure(
    targets: list[Target],
    levels: list[Level],
    duration_s: float,
    warmup_s: float,
    runner: LoadRunner,
    echo=print,
    rounds: int = 1,
    phase: Phase | None = None,
) -> list[list[dict]]:
    """Every target at every level, targets interleaved within a level; one list of rows per round.

    One call goes to every target first: FirstCallFailed stops the run before any measurement.
    Each round rotates the order of the targets, so that over rounds every target runs first,
    second... equally often: on a shared machine the position in a level matters.
    """
    for target in targets:
        await runner.probe(target)
    per_round = []
    for round_index in range(rounds):
        shift = round_index % len(targets)
        order = targets[shift:] + targets[:shift]
        if rounds > 1:
            echo(f"round {round_index + 1} of {rounds}: {', '.join(t.name for t in order)}")
        rows = []
        for level in levels:
            for target in order:
                label = f"{target.name} c={level.concurrency}" + (f" @{level.rate:g}/s" if level.rate else "")
                with (phase or _no_phase)(f"measuring {label}", warmup_s + duration_s):
                    row = await runner.run(target, level, warmup_s, duration_s)
                cpu = row["server_cpu_ms_per_call"]
                echo(
                    f"{target.name:>16} c={level.concurrency:<4} rate={level.rate:g}: {row['rps']:9.1f} req/s "
                    f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms errors {row['errors']}"
                    + (f" server CPU {cpu:.3f} ms/call" if cpu is not None else "")
                )
                rows.append(row)
        per_round.append(rows)
    return per_round


@contextlib.contextmanager
def _no_phase(label: str, expected_s: float) -> Iterator[None]:
    yield


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
                "cpu_per_call_ratio": _ratio(row.get("server_cpu_ms_per_call"), ref.get("server_cpu_ms_per_call")),
            })
    return out


def _ratio(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 3) if reference and value is not None else None


_MEDIAN_FIELDS = ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "server_cpu_ms_per_call", "server_cpu_busy", "load_cpu_busy")
_BY_ROUND_FIELDS = ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_call")
_RATIO_FIELDS = ("rps_ratio", "p50_ratio", "p99_ratio", "cpu_per_call_ratio")


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def combine_rounds(per_round: list[list[dict]], pairs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """One row per target and level (medians over rounds, errors summed, each round's figures kept)
    and the median of the per-round ratios: each ratio is taken inside one round, where both sides
    shared the machine."""
    keyed: dict[tuple, list[dict]] = {}
    for rows in per_round:
        for row in rows:
            keyed.setdefault((row["target"], row["concurrency"], row["rate"]), []).append(row)
    combined = []
    for runs in keyed.values():
        row = dict(runs[0])
        for name in _MEDIAN_FIELDS:
            row[name] = _median(r.get(name) for r in runs)
        row["errors"] = sum(r["errors"] for r in runs)
        codes: dict[str, int] = {}
        for r in runs:
            for code, count in r["error_codes"].items():
                codes[code] = codes.get(code, 0) + count
        row["error_codes"] = codes
        row["first_error"] = next((r["first_error"] for r in runs if r.get("first_error")), "")
        row["requests"] = sum(r.get("requests", 0) for r in runs)
        row["rounds"] = len(runs)
        for name in _BY_ROUND_FIELDS:
            row[f"{name}_by_round"] = [r.get(name) for r in runs]
        loads = [r["loadavg_1m"] for r in runs if r.get("loadavg_1m") is not None]
        row["loadavg_1m"] = max(loads) if loads else None
        combined.append(row)
    combined.sort(key=lambda r: (r["concurrency"], r["rate"]))
    ratio_runs: dict[tuple, list[dict]] = {}
    for rows in per_round:
        for ratio in ratios(rows, pairs):
            ratio_runs.setdefault((ratio["target"], ratio["baseline"], ratio["concurrency"], ratio["rate"]), []).append(ratio)
    compared = []
    for runs in ratio_runs.values():
        ratio = dict(runs[0])
        for name in _RATIO_FIELDS:
            value = _median(r[name] for r in runs)
            ratio[name] = round(value, 3) if value is not None else None
        ratio["rps_ratio_by_round"] = [r["rps_ratio"] for r in runs]
        compared.append(ratio)
    compared.sort(key=lambda r: (r["concurrency"], r["rate"]))
    return combined, compared


def refuse(message: str, code: int = 2) -> typer.Exit:
    """Print ``infergate bench: message`` on stderr; returns the Exit to raise."""
    typer.echo(f"infergate bench: {message}", err=True)
    return typer.Exit(code)


def scenario_module():
    """``benchmarks.scenarios``, or an explained refusal outside a source checkout."""
    try:
        from infergate.benchmarks import scenarios
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "tests":
            raise
        raise refuse(CHECKOUT_REFUSAL) from None
    return scenarios


def cpu_text(cpus: frozenset[int] | None) -> str:
    from infergate.benchmarks.cpus import format_cpu_list

    return format_cpu_list(cpus) if cpus else ""


def describe_target(target: Target, pinning: Pinning) -> dict:
    """What the report says about a target: what it is, where it runs, whether its CPU time is read."""
    from infergate.benchmarks.cpus import allowed_cpus

    cpus = ""
    if target.pid is not None:
        with contextlib.suppress(OSError):
            cpus = allowed_cpus(target.pid)
    return {
        "name": target.name,
        "url": target.url,
        "model": target.model,
        "description": target.description,
        "pid": target.pid,
        "cpus_allowed": cpus,
    }


def client_tls_or_usage_error(ca_file: Path | None, cert_file: Path | None, key_file: Path | None, scenario: str):
    """The validated TLS files for --target servers (None: plaintext); bad options are usage errors."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if scenario:
        raise typer.BadParameter("TLS options are for --target servers; a scenario's servers are plaintext", param_hint="--ca-file")
    from infergate.gateway.tls import TlsOptionsError, client_tls

    try:
        return client_tls(ca_file, cert_file, key_file)
    except TlsOptionsError as exc:
        raise typer.BadParameter(str(exc)) from None
