"""``infergate bench --scenario serving`` end to end: a real subprocess that starts a real gateway
over ONNX Runtime and the ceiling server, drives both with tritonclient, and writes its three files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image

from infergate.benchmarks.scenarios import gateway_config
from infergate.gateway.demo_models import LinearClassifier
from infergate.gateway.local_redis import free_port
from tests.auth.certs import make_pki

INFERGATE = Path(sys.executable).with_name("infergate")  # the installed console script, as users run it
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGETS = {"ceiling", "gateway-onnx"}
LEVELS = {1, 4}


def test_serving_scenario_writes_results_report_and_plot(tmp_path):
    out = tmp_path / "bench"
    argv = [str(INFERGATE), "bench", "--scenario", "serving", "--concurrency", "1,4",
            "--duration-s", "1", "--warmup-s", "0.3", "--out", str(out)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr

    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("infergate bench --scenario serving")
    assert results["machine"] and results["date"]
    rows = {(r["target"], r["concurrency"]): r for r in results["results"]}
    assert set(rows) == {(t, c) for t in TARGETS for c in LEVELS}
    for key, row in rows.items():
        assert row["rps"] > 0, key
        assert row["errors"] == 0 and row["error_codes"] == {}, (key, row["error_codes"])
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["p999_ms"], (key, row)
        assert row["rate"] == 0
    ratios = {(r["target"], r["concurrency"]): r for r in results["ratios"]}
    assert set(ratios) == {("gateway-onnx", c) for c in LEVELS}
    for (target, level), ratio in ratios.items():
        assert ratio["baseline"] == "ceiling"
        expected = rows[(target, level)]["rps"] / rows[("ceiling", level)]["rps"]
        assert abs(ratio["rps_ratio"] - expected) < 1e-3

    report = (out / "report.md").read_text()
    assert "| target | load | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |" in report
    for target in TARGETS:
        for level in LEVELS:
            assert f"| {target} | c={level} | " in report
    assert "| gateway-onnx / ceiling | c=4 |" in report

    png = out / "latency.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _channels = matplotlib.image.imread(png).shape  # decodes the whole image
    assert width > 600 and height > 300


def test_unreachable_target_is_reported_as_errors_with_exit_1(tmp_path):
    out = tmp_path / "bench"
    argv = [str(INFERGATE), "bench", "--target", f"down=127.0.0.1:{free_port()}", "--concurrency", "1",
            "--duration-s", "0.5", "--warmup-s", "0", "--out", str(out)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "down" in done.stderr
    [row] = json.loads((out / "results.json").read_text())["results"]
    assert row["target"] == "down" and row["rps"] == 0
    assert row["errors"] > 0 and row["error_codes"] == {"UNAVAILABLE": row["errors"]}


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
    [refused] = json.loads((tmp_path / "server-only" / "results.json").read_text())["results"]
    assert refused["rps"] == 0 and refused["errors"] > 0 and set(refused["error_codes"]) == {"UNAVAILABLE"}


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
    assert "3 rounds with the target order rotated" in (out / "report.md").read_text()
