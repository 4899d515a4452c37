"""Every shell and Python block of README.md runs as written, against a real gateway and a real Redis.

The blocks run in one working folder as a user's terminal session would: each shell block in
``bash -e -o pipefail`` with the environment the previous blocks exported (``export
INFERGATE_TOKEN=...`` carries on), each Python block in a fresh interpreter with that environment.
The folder holds what the README presumes the user has: ``infergate.yaml`` (the shipped starter
config plus JWT auth with ``keys/jwks.json``, Redis, a second model ``fraud`` and a feature view
``user_profile``), the demo's two ONNX models, and ``users.csv``. The "Development tokens" block
runs first (it makes the key the gateway's ``jwks_file`` names), then the gateway starts
(``infergate serve --config infergate.yaml``), then every other block in README order.

The one change made to a block: the address ``127.0.0.1:8001`` becomes the test gateway's (a free
port; 8001 may be taken on a shared machine).

A block whose info string carries ``no-test`` (```` ```sh no-test ````) is not run; each must be
listed in ``NOT_RUN`` below with the reason, and each entry must still match such a block. YAML
blocks are parsed. Untagged blocks are diagrams and trees, not commands: a test fails if one looks
like a command line.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import redis
import yaml

from infergate.gateway.demo import export_demo, starter_config_text
from tests.support.processes import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_ADDRESS = "127.0.0.1:8001"
BLOCK_TIMEOUT_S = 180.0
SHELL = {"sh", "bash", "shell", "console"}

NOT_RUN = {
    "make demo": "`make test` is the whole suite (this test is part of it); `make demo` is "
                 "tests/gateway/test_demo.py's subject",
    "infergate bench --scenario serving": "starts its own gateway, lean and ceiling servers and measures for minutes; "
                                          "tests/benchmarks/test_bench.py runs the scenario machinery with short phases",
    "pip install 'infergate[gpu]'": "installs onnxruntime-gpu from the network and needs a GPU; "
                                    "benchmarks/gpu_check.sh is the GPU check",
    "docker build": "no Docker engine on the build machines; tests/deploy lints the Dockerfile and, with "
                    "`-m docker` where an engine exists, builds it",
    "docker compose": "no Docker engine; tests/deploy validates deploy/compose.yaml against the compose spec",
    "kubectl create secret": "no cluster; tests/deploy validates deploy/k8s with kubernetes-validate --strict",
    "helm install": "no helm binary or cluster; tests/deploy renders the chart and validates the objects",
}
"""Blocks tagged ``no-test``, by the start of their first line, and why each cannot run here."""


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    tags: frozenset[str]
    text: str

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language or 'untagged'}: {self.first_line[:60]!r})"


def readme_blocks() -> list[Block]:
    blocks, current, body = [], None, []
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^(\s*)```(.*)$", line)
        if fence and current is None:
            words = fence.group(2).split()
            current = (number, len(fence.group(1)), words[0] if words else "", frozenset(words[1:]))
            body = []
        elif fence and current is not None:
            start, indent, language, tags = current
            blocks.append(Block(start, language, tags, "\n".join(text[indent:] for text in body) + "\n"))
            current = None
        elif current is not None:
            body.append(line)
    assert current is None, f"README.md:{current[0]}: a block is never closed"
    return blocks


def runnable(block: Block) -> bool:
    return (block.language in SHELL or block.language == "python") and "no-test" not in block.tags


# -- the bookkeeping (no processes) ----------------------------------------------------------------


def test_every_block_not_run_is_named_with_its_reason_and_every_reason_still_has_its_block():
    skipped = [block for block in readme_blocks() if "no-test" in block.tags]
    unexplained = [str(b) for b in skipped if not any(b.first_line.startswith(key) for key in NOT_RUN)]
    stale = [key for key in NOT_RUN if not any(b.first_line.startswith(key) for b in skipped)]
    assert not unexplained, f"blocks tagged no-test without a reason in NOT_RUN: {unexplained}"
    assert not stale, f"NOT_RUN names blocks that are gone or run now: {stale}"
    assert all(block.language in SHELL | {"python"} for block in skipped)


def test_untagged_blocks_are_not_commands_and_yaml_blocks_parse():
    blocks = readme_blocks()
    assert sum(runnable(block) for block in blocks) >= 6
    for block in blocks:
        if block.language == "":
            commands = [line for line in block.text.splitlines() if re.match(r"\s*(\$ |infergate |export |pip |make )", line)]
            assert not commands, f"{block} holds commands: tag it sh (or sh no-test)"
        elif block.language == "yaml":
            assert isinstance(yaml.safe_load(block.text), dict), str(block)


# -- the blocks, run -------------------------------------------------------------------------------


class Session:
    """A user's terminal in ``workdir``: the environment exported by one block is there for the next."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self._dump = workdir.parent / "env.dump"

    def run(self, block: Block, address: str) -> subprocess.CompletedProcess:
        text = block.text.replace(README_ADDRESS, address)
        if block.language == "python":
            argv, stdin = [sys.executable, "-"], text
        else:
            argv, stdin = ["bash", "-e", "-o", "pipefail", "-s"], f"{text}\nenv -0 > {str(self._dump)!r}\n"
        done = subprocess.run(argv, input=stdin, cwd=self.workdir, env=self.env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, f"{block} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert "Traceback" not in done.stdout + done.stderr, f"{block}\n{done.stderr}"
        if block.language != "python":
            self.env = dict(item.split("=", 1) for item in self._dump.read_text().split("\0") if "=" in item)
        return done


def user_folder(workdir: Path, redis_url: str) -> dict:
    """What the README presumes the user has; returns the gateway config written as infergate.yaml."""
    export_demo(workdir)  # the demo's models (and the starter config, replaced below)
    config = yaml.safe_load(starter_config_text())
    server = {key: value for key, value in config.get("server", {}).items() if key not in ("listen", "metrics_listen")}
    config["server"] = server  # GatewayProcess gives it free ports
    config["auth"] = {"mode": "jwt", "issuer": "https://auth.example.com", "audience": "infergate",
                      "algorithms": ["RS256"], "jwks_file": "keys/jwks.json"}
    config["redis"] = {"url": redis_url}
    classifier = config["models"]["classifier"]["variants"]
    config["models"]["fraud"] = {"variants": {
        "v1": {**classifier["v1"], "weight": 100}, "v2": {**classifier["v2"], "weight": 0}}}
    config["feature_views"] = {"user_profile": {"key_template": "user:{id}", "dim": 4}}
    (workdir / "users.csv").write_text("user_id,f0,f1,f2,f3\nu1,0.1,0.2,0.3,0.4\nu2,1,2,3,4\n", encoding="utf-8")
    return config


def shim_bin(folder: Path) -> Path:
    """``infergate`` on PATH as this interpreter's ``python -m infergate`` (the command the README types)."""
    folder.mkdir()
    shim = folder / "infergate"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m infergate "$@"\n', encoding="utf-8")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return folder


def test_every_shell_and_python_block_runs_as_written(tmp_path, redis_url):
    blocks = [block for block in readme_blocks() if runnable(block)]
    [tokens] = [block for block in blocks if "openssl genpkey" in block.text]
    workdir = tmp_path / "user"
    workdir.mkdir()
    config = user_folder(workdir, redis_url)
    env = {key: value for key, value in os.environ.items() if not key.startswith("INFERGATE_")}
    env["PATH"] = f"{shim_bin(tmp_path / 'bin')}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "160"
    env["NO_COLOR"] = "1"
    session = Session(workdir, env)

    # `infergate serve --config infergate.yaml` in the user's folder (config written now, started below)
    gateway = GatewayProcess(config, workdir, name="infergate", command=[str(tmp_path / "bin" / "infergate")])
    session.run(tokens, README_ADDRESS)  # iss and aud from infergate.yaml; keys/jwks.json for the gateway
    assert session.env.get("INFERGATE_TOKEN", "").count(".") == 2, "the Development tokens block exports a JWT"
    pid = gateway.start().process.pid
    outputs = {}
    try:
        for block in blocks:
            if block is not tokens:
                outputs[block.line] = session.run(block, gateway.url)
    finally:
        gateway.stop()

    by_start = {block.first_line: outputs.get(block.line) for block in blocks}
    tritonclient_block = next(out for first, out in by_start.items() if first == "import os")
    assert tritonclient_block.stdout.splitlines()[-1] in ("v1", "v2")  # the variant that answered
    admin_block = next(out for first, out in by_start.items() if first.startswith("export INFERGATE_GATEWAY="))
    assert "rollback" in admin_block.stdout and "promote" in admin_block.stdout  # the audit log, newest first
    assert "p99 regression" in admin_block.stdout
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.exists("user:u1") and client.exists("user:u2")  # features load wrote the rows
    finally:
        client.close()
    results = json.loads((workdir / "bench-out" / "results.json").read_text())
    assert {row["target"] for row in results["results"]} == {"gw"}
    for row in results["results"]:
        assert row["errors"] == 0 and row["rps"] > 0, row
        assert row["server_cpu_ms_per_call"], row  # --target-pid found this gateway
    assert results["command"].count(f"--target-pid gw={pid} ") == 1, results["command"]
