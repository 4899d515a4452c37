"""``infergate bench``: the command's options; the measuring is ``infergate.benchmarks.bench``."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from infergate.benchmarks.bench import (
    DEFAULT_BASELINE,
    LOAD_BUSY_WARNING,
    FirstCallFailed,
    Level,
    LoadRunner,
    LoadSettings,
    Target,
    client_tls_or_usage_error,
    combine_rounds,
    comparisons,
    console_phase,
    cpu_text,
    describe_target,
    load_average,
    machine_description,
    measure,
    parse_numbers,
    parse_target,
    parse_target_pids,
    pin_this_process,
    refuse,
    resolve_pinning,
    scenario_module,
    source_revision,
)

commands = typer.Typer()


@commands.command("bench")
def bench_command(
    target: list[str] = typer.Option([], "--target", help="NAME=HOST:PORT of a running server (repeatable)."),
    target_pid: list[str] = typer.Option([], "--target-pid", help="NAME=PID: a --target's server process, for its CPU time per call."),
    scenario: str = typer.Option("", help="Start the servers of a scenario instead: 'serving', 'observability' or 'scaling' (1, 2, 4, 8 workers)."),
    with_triton: bool = typer.Option(False, "--with-triton", help="serving: add Triton direct and gateway over Triton."),
    model: str = typer.Option("classifier", help="Model called on --target servers."),
    concurrency: str = typer.Option("1,32", help="Concurrent callers per level, comma-separated."),
    rate: str = typer.Option("0", help="Total requests/s per level, comma-separated; 0 = closed loop."),
    duration_s: float = typer.Option(8.0, "--duration-s", min=0.1, help="Measured seconds per target and level."),
    warmup_s: float = typer.Option(1.0, "--warmup-s", min=0.0, help="Unmeasured seconds before each run."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Directory for results.json, report.md, latency.png."),
    token: str = typer.Option("", envvar="INFERGATE_TOKEN", help="Sent as 'authorization: Bearer TOKEN'."),
    baseline: Optional[str] = typer.Option(None, help="Target the ratios are taken against [default: ceiling when there is one, else the first target]."),
    features: int = typer.Option(16, min=1, help="Each request is one FP32 row of this many values..."),
    input_name: str = typer.Option("INPUT", help="...in the input of this name."),
    machine: str = typer.Option("", help="Machine description for the report (default: detected)."),
    ca_file: Optional[Path] = typer.Option(None, "--ca-file", help="TLS to --target servers: the CA that signed them."),
    cert_file: Optional[Path] = typer.Option(None, "--cert-file", help="Client certificate for mutual TLS..."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="...and its private key."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Repeat every level this often, rotating the target order; report medians."),
    pin: bool = typer.Option(True, "--pin/--no-pin", help="Pin servers and load to disjoint CPUs."),
    server_cpus: str = typer.Option("", "--server-cpus", help="CPUs for the servers a scenario starts, e.g. 0 or 0-7 [default: first half]."),
    client_cpus: str = typer.Option("", "--client-cpus", help="CPUs for the load generator [default: the other CPUs]."),
    load: str = typer.Option("raw", "--load", help="raw: one pre-serialized request over grpc.aio (light); tritonclient: the real client."),
    load_processes: int = typer.Option(1, "--load-processes", min=1, help="Spread the callers over this many processes."),
    plot: Optional[bool] = typer.Option(
        None, "--plot/--no-plot", show_default=False,
        help="Draw latency.png (needs matplotlib: infergate[bench]) [default: when matplotlib is installed].",
    ),
) -> None:
    """Measure requests/s, latency percentiles and server CPU per call of targets side by side; write results, report, plot."""
    from infergate.benchmarks.loadgen import MODES

    targets = [parse_target(t, model) for t in target]
    if bool(targets) == bool(scenario):
        raise typer.BadParameter("give either --target (one or more) or --scenario", param_hint="--target/--scenario")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"target names repeat: {names}", param_hint="--target")
    if target_pid and scenario:
        raise typer.BadParameter("a scenario knows its servers' processes; --target-pid is for --target", param_hint="--target-pid")
    targets = parse_target_pids(target_pid, targets)
    if load not in MODES:
        raise typer.BadParameter(f"{load!r}: expected one of {', '.join(MODES)}", param_hint="--load")
    if baseline is not None and targets and baseline not in names:
        raise typer.BadParameter(f"{baseline!r} is not a target (targets: {', '.join(names)})", param_hint="--baseline")
    levels = [
        Level(c, r)
        for c in parse_numbers(concurrency, int, "--concurrency", 1)
        for r in parse_numbers(rate, float, "--rate", 0)
    ]
    tls = client_tls_or_usage_error(ca_file, cert_file, key_file, scenario)
    if plot is not False and importlib.util.find_spec("matplotlib") is None:
        if plot:
            raise refuse("the plot needs matplotlib, which is not installed: pip install 'infergate[bench]' (or add --no-plot)")
        typer.echo("infergate bench: no latency.png (matplotlib is not installed: pip install 'infergate[bench]'); "
                   "writing results.json and report.md", err=True)
        plot = False
    plot = plot is not False
    scenarios = scenario_module() if scenario else None
    if scenarios is not None and scenario not in scenarios.SCENARIOS:
        raise typer.BadParameter(f"{scenario!r}: known scenarios are {', '.join(scenarios.SCENARIOS)}", param_hint="--scenario")
    pinning = resolve_pinning(pin, server_cpus, client_cpus)
    if pinning.client is not None:
        pin_this_process(pinning.client)
    settings = LoadSettings(
        load, load_processes, features, input_name, (("authorization", f"Bearer {token}"),) if token else (), tls
    )
    phase = console_phase()
    meta = {
        "machine": machine or machine_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["infergate", *_without_secrets(sys.argv[1:])]),
        "revision": source_revision(),
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rounds": rounds,
        "pinning": pinning.describe(),
        "server_cpus": cpu_text(pinning.server),
        "client_cpus": cpu_text(pinning.client),
        "load": {"mode": load, "processes": load_processes},
        "loadavg_1m_start": load_average(),
    }
    typer.echo(f"pinning: {pinning.describe()}; load: {load}, {load_processes} process(es)")

    def run(targets: list[Target]) -> tuple[list[dict], list[dict]]:
        reference = baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in {t.name for t in targets} else targets[0].name)
        meta["baseline"] = reference
        meta["targets"] = [describe_target(t, pinning) for t in targets]
        with LoadRunner(settings) as runner:
            per_round = asyncio.run(measure(targets, levels, duration_s, warmup_s, runner, typer.echo, rounds, phase))
        meta["loadavg_1m_end"] = load_average()
        return combine_rounds(per_round, comparisons(targets, reference))

    try:
        if scenarios is not None:
            with tempfile.TemporaryDirectory(prefix="infergate-bench-") as workdir:
                typer.echo(f"starting scenario {scenario}")
                try:
                    with scenarios.start_scenario(scenario, Path(workdir), with_triton, pinning.server, phase) as started:
                        rows, compared = run(started)
                except RuntimeError as exc:  # a server did not start; the message carries its output
                    raise refuse(str(exc), 1) from None
        else:
            rows, compared = run(targets)
    except FirstCallFailed as exc:
        raise refuse(f"{exc}; stopped before measuring", 1) from None

    from infergate.benchmarks.report import write_all

    paths = write_all(out, meta, rows, compared, plot=plot)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
    busy = sorted({r["target"] for r in rows if (r.get("load_cpu_busy") or 0) > LOAD_BUSY_WARNING})
    if busy:
        typer.echo(
            f"infergate bench: a load process was over {LOAD_BUSY_WARNING:.0%} busy against {', '.join(busy)}: "
            "those figures may be the load generator's limit (try --load-processes or more --client-cpus)",
            err=True,
        )
    failed = [r["target"] for r in rows if r["errors"] or not r["rps"]]
    if failed:
        first = next((r["first_error"] for r in rows if r.get("first_error")), "")
        typer.echo(
            f"infergate bench: errors or no answers from: {', '.join(sorted(set(failed)))}" + (f" (first: {first})" if first else ""),
            err=True,
        )
        raise typer.Exit(1)


def _without_secrets(argv: list[str]) -> list[str]:
    """The command line as recorded in results and reports: a ``--token`` value is never written."""
    shown = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("TOKEN")
            hide_next = False
        elif arg == "--token":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--token="):
            shown.append("--token=TOKEN")
        else:
            shown.append(arg)
    return shown
