"""Run `sdlite serve` as a child process on loopback with ephemeral ports (tests, benches).

    with ServerProcess(model, "--threads", "1") as server:
        server.grpc_port, server.http_port      # read back from the --port-file the server writes
        ...
    # leaving the block: SIGTERM, then SIGKILL if it has not exited within `stop_timeout`
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ServerProcess:
    def __init__(self, model, *args: str, python: str = sys.executable, startup_timeout: float = 90.0,
                 stop_timeout: float = 20.0, env: dict | None = None, preexec_fn=None):
        self.model, self.args, self.python = str(model), list(args), python
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.env = env
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. join a memory cgroup)
        self._dir = tempfile.TemporaryDirectory(prefix="sdlite-serve-")
        self.port_file = Path(self._dir.name) / "ports.json"
        self.log_path = Path(self._dir.name) / "server.log"
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}

    @property
    def grpc_port(self) -> int:
        return self.ports["grpc"]

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> "ServerProcess":
        cmd = [self.python, "-m", "sdlite", "serve", "-m", self.model, "--host", "127.0.0.1",
               "--grpc-port", "0", "--http-port", "0", "--port-file", str(self.port_file), *self.args]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, preexec_fn=self.preexec_fn)
        end = time.monotonic() + self.startup_timeout
        while time.monotonic() < end:
            if self.port_file.exists():
                self.ports = json.loads(self.port_file.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdlite serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"sdlite serve did not start within {self.startup_timeout}s:\n{self.log()}")

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._dir.cleanup()
