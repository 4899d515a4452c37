"""Real Triton and gateway processes for the tests, started on free ports and always stopped.

``TritonProcess`` runs ``tests/support/triton_models.py`` (the Triton binary of nvidia-pytriton)
with the interpreter's own libpython first on LD_LIBRARY_PATH, which Triton's Python backend stub
needs when Python comes from pyenv. ``GatewayProcess`` runs ``infergate serve`` on a config the
test writes. Both wait for readiness, keep the process's output in a log file, and are stopped
(SIGTERM, then SIGKILL) by ``stop``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import yaml

from infergate.gateway.local_redis import free_port

ROOT = Path(__file__).resolve().parents[2]
TRITON_START_TIMEOUT_S = 90.0
GATEWAY_START_TIMEOUT_S = 60.0


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Process:
    """A child process whose combined output goes to ``log_path``; ``ready_line`` marks readiness."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path = ROOT) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def _spawn(self, ready: re.Pattern, timeout_s: float) -> re.Match:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, text=True,
            start_new_session=True,
        )
        found: list[re.Match] = []
        seen = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            with open(self.log_path, "a", encoding="utf-8") as log:
                for line in self.process.stdout:
                    log.write(line)
                    log.flush()
                    self._lines.append(line)
                    if not seen.is_set():
                        match = ready.search(line)
                        if match:
                            found.append(match)
                            seen.set()
            seen.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not seen.wait(timeout_s) or not found:
            tail = "".join(self._lines[-30:])
            self.stop()
            raise RuntimeError(f"{self.argv[1:3]} did not become ready in {timeout_s}s; output:\n{tail}")
        return found[0]

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout_s)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group; returns the exit code."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                code = None
        try:  # children (tritonserver, stubs) live in the same session
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if code is None:
            code = self.process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the process and everything it started, at once."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
            if self._reader is not None:
                self._reader.join(5)
            self.process = None


class TritonProcess(_Process):
    """The real Triton server with the test models of ``triton_models.py``."""

    def __init__(
        self, log_dir: Path, grpc_port: int | None = None, otlp_traces_url: str = "", nobatcher_model: bool = False
    ) -> None:
        """``otlp_traces_url``: Triton traces every request and exports its spans there (OTLP/HTTP);
        ``nobatcher_model`` also serves ``linear_nobatcher`` (the benchmarks' Triton model without a batcher)."""
        self.grpc_port = grpc_port or free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        argv = [
            sys.executable, str(ROOT / "tests" / "support" / "triton_models.py"),
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
        ]
        if otlp_traces_url:
            argv += ["--otlp-traces-url", otlp_traces_url]
        if nobatcher_model:
            argv.append("--nobatcher-model")
        super().__init__(argv, log_dir / f"triton-{self.grpc_port}.log", _python_env())

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> TritonProcess:
        self._spawn(re.compile(r"triton ready"), TRITON_START_TIMEOUT_S)
        return self


class GatewayProcess(_Process):
    """``infergate serve`` on a config written from a dict (listen and metrics ports default to free ones)."""

    def __init__(
        self, config: dict, workdir: Path, name: str = "gateway", extra_env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        """``command``: what runs ``infergate`` (default this interpreter's ``-m infergate``); given, the
        process runs in ``workdir`` with the config named relative to it, as a user would type it."""
        config = dict(config)
        server = dict(config.get("server", {}))
        server.setdefault("listen", f"127.0.0.1:{free_port()}")
        server.setdefault("metrics_listen", f"127.0.0.1:{free_port()}")
        config["server"] = server
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.port: int | None = None
        self.metrics_port: int | None = None
        env = _python_env()
        env.update(extra_env or {})
        if command is None:
            argv = [sys.executable, "-m", "infergate", "serve", "--config", str(self.config_path)]
            super().__init__(argv, workdir / f"{name}.log", env)
        else:
            argv = [*command, "serve", "--config", self.config_path.name]
            super().__init__(argv, workdir / f"{name}.log", env, cwd=workdir)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        match = self._spawn(re.compile(r"listening on port (\d+) metrics_port (\d+)"), GATEWAY_START_TIMEOUT_S)
        self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
        return self


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; raise AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(interval_s)
