"""Running `orchestrator serve` as a real child process, configured like `make run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.redis_process import free_port

BIN = Path(sys.executable).parent


class ServerProcess:
    """`orchestrator serve` on a free loopback port, with its output captured to a file."""

    def __init__(self, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            **os.environ,
            "ORCH_LISTEN_ADDRESS": self.address,
            "ORCH_WS_ADDRESS": "127.0.0.1:0",
            "ORCH_METRICS_ADDRESS": "127.0.0.1:0",
            **env,
        }
        self._env.pop("REDIS_URL", None) if "REDIS_URL" not in env else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "orchestrator"), "serve"],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            probe = subprocess.run(
                [str(BIN / "orchestrator"), "health", "--address", self.address, "--timeout", "1"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def terminate(self, timeout_s: float = 15.0) -> int:
        """Send SIGTERM and wait for the process to exit; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
