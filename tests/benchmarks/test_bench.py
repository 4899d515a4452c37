"""``infergate bench`` end to end: real subprocesses that start real servers (the gateway over ONNX
Runtime, the lean and ceiling servers), pin them, drive them, read their CPU time and write the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from infergate.benchmarks.cpus import format_cpu_list, usable_cpus
from infergate.benchmarks.scenarios import CeilingProcess, gateway_config
from infergate.gateway.demo_models import LinearClassifier
from infergate.gateway.local_redis import free_port
from tests.gateway.auth.certs import make_pki

INFERGATE = Path(sys.executable).with_name("infergate")  # the installed console script, as users run it
ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGETS = {"ceiling", "lean", "gateway-onnx"}
LEVELS = {1, 4}


def _cpu_split() -> tuple[str, str | None]:
    """The last usable CPU for the servers, the others (if any) for the load."""
    cpus = sorted(usable_cpus())
    return str(cpus[-1]), format_cpu_list(set(cpus[:-1])) or None


def test_serving_scenario_pins_servers_reads_their_cpu_and_writes_results_report_and_plot(tmp_path):
    out = tmp_path / "bench"
    server_cpus, client_cpus = _cpu_split()
    argv = [str(INFERGATE), "bench", "--scenario", "serving", "--concurrency", "1,4",
            "--duration-s", "1", "--warmup-s", "0.3", "--out", str(out), "--server-cpus", server_cpus]
    argv += ["--client-cpus", client_cpus] if client_cpus else []
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("infergate bench --scenario serving")
    assert results["machine"] and results["date"]
    assert results["server_cpus"] == server_cpus and results["client_cpus"] == (client_cpus or "")
    assert results["load"] == {"mode": "raw", "processes": 1}
    assert results["loadavg_1m_start"] is not None and results["loadavg_1m_end"] is not None
    described = {t["name"]: t for t in results["targets"]}
    assert set(described) == TARGETS
    for name, target in described.items():
        assert target["description"] and target["pid"], name
        assert target["cpus_allowed"] == server_cpus, (name, target)
    rows = {(r["target"], r["concurrency"]): r for r in results["results"]}
    assert set(rows) == {(t, c) for t in TARGETS for c in LEVELS}
    for key, row in rows.items():
        assert row["rps"] > 0, key
        assert row["errors"] == 0 and row["error_codes"] == {}, (key, row["error_codes"])
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["p999_ms"], (key, row)
        assert row["rate"] == 0
        assert row["server_cpu_ms_per_call"] > 0, key  # read from /proc for every started server
        assert row["loadavg_1m"] is not None
    ratios = {(r["target"], r["baseline"], r["concurrency"]): r for r in results["ratios"]}
    assert set(ratios) == {(t, "ceiling", c) for t in ("lean", "gateway-onnx") for c in LEVELS} | {
        ("gateway-onnx", "lean", c) for c in LEVELS
    }
    for (target, reference, level), ratio in ratios.items():
        expected = rows[(target, level)]["rps"] / rows[(reference, level)]["rps"]
        assert abs(ratio["rps_ratio"] - expected) < 1e-3
        expected_cpu = rows[(target, level)]["server_cpu_ms_per_call"] / rows[(reference, level)]["server_cpu_ms_per_call"]
        assert abs(ratio["cpu_per_call_ratio"] - expected_cpu) < 1e-2 * expected_cpu

    report = (out / "report.md").read_text()
    assert "| target | load | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | server CPU ms/call | errors |" in report
    for target in TARGETS:
        assert f"- `{target}` (" in report  # what each target is
        for level in LEVELS:
            assert f"| {target} | c={level} | " in report
    assert "| gateway-onnx / ceiling | c=4 |" in report and "| gateway-onnx / lean | c=4 |" in report
    assert f"- CPUs: servers on CPU {server_cpus}" in report
    assert "host load average (1 min) during the run: " in report

    png = out / "latency.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _channels = matplotlib.image.imread(png).shape  # decodes the whole image
    assert width > 600 and height > 300


def test_unreachable_target_stops_before_measuring_with_the_status_and_message(tmp_path):
    out = tmp_path / "bench"
    argv = [str(INFERGATE), "bench", "--target", f"down=127.0.0.1:{free_port()}", "--concurrency", "1",
            "--duration-s", "30", "--warmup-s", "0", "--out", str(out)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=25)  # 30 s measured would time out
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("infergate bench: down (127.0.0.1:") and "the first call failed: UNAVAILABLE: " in line
    assert line.endswith("stopped before measuring")
    assert "Traceback" not in done.stderr and "measuring down" not in done.stderr
    assert not out.exists()


def test_a_wrong_input_is_refused_on_the_first_call_with_the_servers_message(tmp_path, gateway_process):
    config = gateway_config(LinearClassifier.random(seed=1).save(tmp_path / "classifier.onnx"))
    gateway = gateway_process(config)
    argv = [str(INFERGATE), "bench", "--target", f"gw={gateway.url}", "--features", "3", "--concurrency", "1",
            "--duration-s", "30", "--out", str(tmp_path / "bench")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=25)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gw (" in done.stderr and "the first call failed: INVALID_ARGUMENT: " in done.stderr
    assert not (tmp_path / "bench").exists()


def test_unknown_baseline_is_refused_before_measuring(tmp_path):
    argv = [str(INFERGATE), "bench", "--target", f"a=127.0.0.1:{free_port()}", "--baseline", "ceiling",
            "--out", str(tmp_path / "bench")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 2
    assert "'ceiling' is not a target (targets: a)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "bench").exists()


def _bench_without_matplotlib(tmp_path, *options: str) -> subprocess.CompletedProcess:
    """Run as an environment without matplotlib: the import system answers "not installed" for it."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from infergate.gateway.cli import main\n"
        f"sys.argv = ['infergate', 'bench', '--target', 'a=127.0.0.1:{free_port()}', '--out', {str(tmp_path / 'b')!r},"
        f" *{list(options)!r}]\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_missing_matplotlib_with_plot_asked_for_is_said_in_one_line_before_measuring(tmp_path):
    done = _bench_without_matplotlib(tmp_path, "--plot")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        "infergate bench: the plot needs matplotlib, which is not installed: pip install 'infergate[bench]' (or add --no-plot)"
    )
    assert done.stdout == "" and not (tmp_path / "b").exists()


def test_missing_matplotlib_by_default_is_said_first_and_the_run_goes_on_without_the_plot(tmp_path):
    """A plain ``pip install infergate`` can bench: the plot is left out, in one line, before any work."""
    done = _bench_without_matplotlib(tmp_path)
    lines = done.stderr.strip().splitlines()
    assert lines[0] == ("infergate bench: no latency.png (matplotlib is not installed: pip install 'infergate[bench]'); "
                        "writing results.json and report.md")
    # The run went on to the measurement: the target (nobody listens) stops it there, with its status.
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr, done.stdout + done.stderr


def test_target_pid_gives_cpu_per_call_and_several_load_processes_share_the_callers(tmp_path):
    servers = [CeilingProcess(tmp_path / name).start() for name in ("a", "b")]
    try:
        out = tmp_path / "bench"
        argv = [str(INFERGATE), "bench", "--target", f"known={servers[0].url}", "--target", f"unknown={servers[1].url}",
                "--target-pid", f"known={servers[0].process.pid}", "--load", "tritonclient", "--load-processes", "2",
                "--concurrency", "3", "--duration-s", "0.8", "--warmup-s", "0.2", "--no-plot", "--out", str(out)]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    finally:
        for server in servers:
            server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "known"  # no target named ceiling: the first one
    assert results["load"] == {"mode": "tritonclient", "processes": 2}
    rows = {r["target"]: r for r in results["results"]}
    assert rows["known"]["server_cpu_ms_per_call"] > 0 and rows["unknown"]["server_cpu_ms_per_call"] is None
    for row in rows.values():
        assert row["load_processes"] == 2 and row["rps"] > 0 and row["errors"] == 0
        assert 0 < row["load_cpu_busy"] <= 1.5
    assert sorted(os.listdir(out)) == ["report.md", "results.json"]  # --no-plot
    assert "process unknown: no CPU time" in (out / "report.md").read_text()


def test_bad_pinning_options_are_usage_errors(tmp_path):
    base = [str(INFERGATE), "bench", "--target", f"a=127.0.0.1:{free_port()}", "--out", str(tmp_path / "bench")]
    wide = {**os.environ, "COLUMNS": "300"}  # typer's usage box wraps to the terminal's width

    def bench(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run(base + list(options), capture_output=True, text=True, timeout=60, env=wide)

    one = str(min(usable_cpus()))  # this process may be narrowed to some CPUs (taskset, a container)
    overlap = bench("--server-cpus", one, "--client-cpus", one)
    absent = bench("--server-cpus", "4096")
    garbled = bench("--client-cpus", "1-x")
    assert [overlap.returncode, absent.returncode, garbled.returncode] == [2, 2, 2]
    assert f"share CPU {one};" in overlap.stderr
    assert "CPU 4096 is not available here" in absent.stderr
    assert "expected CPU numbers and ranges" in garbled.stderr
    assert not (tmp_path / "bench").exists()


def test_scenario_outside_a_checkout_is_an_explained_refusal(tmp_path):
    """The wheel installed on its own (no tests/ beside it), as `pip install infergate` leaves it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("infergate-*.whl")
    site = tmp_path / "site"
    import zipfile

    zipfile.ZipFile(wheel).extractall(site)
    code = "import sys; from infergate.gateway.cli import main; sys.argv = ['infergate'] + sys.argv[1:]; main()"
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code, "bench", "--scenario", "serving", "--out", str(tmp_path / "b")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    loaded = subprocess.run([sys.executable, "-c", "import infergate; print(infergate.__file__)"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == str(site / "infergate" / "__init__.py")  # really the wheel's copy
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "No module named" not in done.stderr
    assert "source checkout" in done.stderr and "--target NAME=HOST:PORT" in done.stderr
    assert not (tmp_path / "b").exists()


def test_bad_target_is_a_usage_error(tmp_path):
    argv = [str(INFERGATE), "bench", "--target", "no-port-here", "--out", str(tmp_path / "bench")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "NAME=HOST:PORT" in done.stderr
    assert not (tmp_path / "bench").exists()


def test_tls_options_reach_a_mutual_tls_gateway(tmp_path, gateway_process):
    pki = make_pki(tmp_path / "pki")
    config = gateway_config(LinearClassifier.random(seed=1).save(tmp_path / "classifier.onnx"))
    config["server"]["tls"] = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "client_ca_file": str(pki.ca)}
    gateway = gateway_process(config)

    def bench(out: str, *tls: str) -> subprocess.CompletedProcess:
        argv = [str(INFERGATE), "bench", "--target", f"gw={gateway.url}", "--concurrency", "2",
                "--duration-s", "0.5", "--warmup-s", "0.2", "--out", str(tmp_path / out), *tls]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    mutual = bench("mutual", "--ca-file", str(pki.ca), "--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key))
    server_only = bench("server-only", "--ca-file", str(pki.ca))

    assert mutual.returncode == 0, mutual.stdout + mutual.stderr
    [row] = json.loads((tmp_path / "mutual" / "results.json").read_text())["results"]
    assert row["rps"] > 0 and row["errors"] == 0
    assert server_only.returncode == 1, server_only.stdout + server_only.stderr
    assert "the first call failed: UNAVAILABLE" in server_only.stderr  # the gateway wants a client certificate
    assert not (tmp_path / "server-only").exists()


def test_rounds_rotate_the_target_order_and_report_medians(tmp_path):
    from infergate.benchmarks.scenarios import CeilingProcess

    servers = [CeilingProcess(tmp_path / name).start() for name in ("a", "b")]
    try:
        out = tmp_path / "bench"
        argv = [str(INFERGATE), "bench", "--target", f"first={servers[0].url}", "--target", f"second={servers[1].url}",
                "--baseline", "first", "--concurrency", "2", "--rounds", "3", "--duration-s", "0.4", "--warmup-s", "0.1",
                "--out", str(out)]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    finally:
        for server in servers:
            server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    orders = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("round ")]
    assert orders == ["first, second", "second, first", "first, second"]
    results = json.loads((out / "results.json").read_text())
    assert results["rounds"] == 3
    rows = {r["target"]: r for r in results["results"]}
    for row in rows.values():
        assert row["rounds"] == 3 and len(row["rps_by_round"]) == 3
        assert row["rps"] == sorted(row["rps_by_round"])[1]  # the median of three
    [ratio] = results["ratios"]
    per_round = [s / f for s, f in zip(rows["second"]["rps_by_round"], rows["first"]["rps_by_round"])]
    assert ratio["rps_ratio_by_round"] == [round(r, 3) for r in per_round]
    assert ratio["rps_ratio"] == sorted(ratio["rps_ratio_by_round"])[1]
    report = (out / "report.md").read_text()
    assert "3 rounds with the target order rotated" in report
    assert "## Spread across rounds" in report and "| first | c=2 | " in report


def test_the_recorded_command_never_holds_the_token():
    from infergate.gateway.cli.bench import _without_secrets

    assert _without_secrets(["--token", "eyJsecret", "--target", "a=h:1"]) == ["--token", "TOKEN", "--target", "a=h:1"]
    assert _without_secrets(["--token=eyJsecret"]) == ["--token=TOKEN"]


def test_scaling_scenario_pins_each_gateway_to_its_first_n_cpus_and_every_worker_serves(tmp_path):
    """The scaling scenario on the CPUs this machine has (1 and 2 workers on two CPUs; 4 and 8 on
    bigger machines): each gateway and its workers run on the first N server CPUs, and calls reach them."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from infergate.benchmarks.cpus import allowed_cpus, parse_cpu_list
    from infergate.benchmarks.scenarios import MODEL, scaling

    cpus = sorted(usable_cpus())[:2]
    assert len(cpus) == 2, "the suite's machines have at least 2 CPUs"
    with scaling(tmp_path, frozenset(cpus)) as targets:
        assert [t.name for t in targets] == ["workers-1", "workers-2"]
        assert targets[1].compare_to == "workers-1"
        for target, expected in zip(targets, ({cpus[0]}, set(cpus))):
            workers = [int(pid) for pid in Path(f"/proc/{target.pid}/task/{target.pid}/children").read_text().split()]
            assert parse_cpu_list(allowed_cpus(target.pid)) == expected
            assert all(parse_cpu_list(allowed_cpus(pid)) == expected for pid in workers)
            client = grpcclient.InferenceServerClient(target.url)
            row = grpcclient.InferInput("INPUT", [1, 16], "FP32")
            row.set_data_from_numpy(np.ones((1, 16), np.float32))
            for _ in range(8):
                answer = client.infer(MODEL, [row])
                assert answer.as_numpy("PROBS").shape == (1, 4)
            client.close()
        assert len([int(p) for p in Path(f"/proc/{targets[1].pid}/task/{targets[1].pid}/children").read_text().split()]) >= 2
