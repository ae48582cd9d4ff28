"""Running `orchestrator serve` as a real child process, configured like `make run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.redis_process import free_port

BIN = Path(sys.executable).parent
# One `orchestrator health` probe: its call times out after 1 s, but a probe process that never
# exits must not hold the waiting thread (often an asyncio.to_thread worker, which the event
# loop's close joins without a bound) for ever.
PROBE_BOUND_S = 15.0


def wait_healthy(
    proc: subprocess.Popen[bytes],
    address: str,
    name: str,
    read_log: Callable[[], str],
    timeout_s: float,
) -> None:
    """Waits until ``orchestrator health`` answers on ``address``; raises (with the log) if
    ``proc`` exits first or stays unhealthy for ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{read_log()}")
        try:
            probe = subprocess.run(
                [str(BIN / "orchestrator"), "health", "--address", address, "--timeout", "1"],
                capture_output=True,
                check=False,
                timeout=PROBE_BOUND_S,
            )
        except subprocess.TimeoutExpired:
            continue  # killed by run(): not healthy yet
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not become healthy:\n{read_log()}")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Kills ``proc`` if it still runs and reaps it."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


class ServerProcess:
    """`orchestrator serve` on a free loopback port, with its output captured to a file."""

    def __init__(self, log_path: Path, **env: str) -> None:
        """An ``ORCH_LISTEN_ADDRESS`` of 127.0.0.1:PORT in ``env`` listens there (a restart on
        the same address) instead of on a free port."""
        given = env.get("ORCH_LISTEN_ADDRESS", "")
        self.port = int(given.rpartition(":")[2]) if given else free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            **os.environ,
            "ORCH_LISTEN_ADDRESS": self.address,
            "ORCH_WS_ADDRESS": "127.0.0.1:0",
            "ORCH_METRICS_ADDRESS": "127.0.0.1:0",
            # Most process tests run no Agent Management: sessions take any agent id unless
            # the test turns the check on (ORCH_AGENT_CHECK="true").
            "ORCH_AGENT_CHECK": "false",
            # ...and run messages as one call unless the test turns plans on (ORCH_PLANS).
            "ORCH_PLANS": "false",
            **env,
        }
        self._env.pop("REDIS_URL", None) if "REDIS_URL" not in env else None
        self.proc: subprocess.Popen[bytes] | None = None
        # More arguments of `orchestrator serve` (e.g. ["--processes", "2"]).
        self.serve_args: list[str] = []

    def start(self, timeout_s: float = 20.0) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "orchestrator"), "serve", *self.serve_args],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(self.proc, self.address, "server", self.log, timeout_s)

    def successor(self, log_path: Path) -> ServerProcess:
        """A process (not started) with this one's configuration on the same port: a restart."""
        successor = ServerProcess(log_path)
        successor.port, successor.address = self.port, self.address
        successor._env = dict(self._env)
        return successor

    def terminate(self, timeout_s: float = 15.0) -> int:
        """Send SIGTERM and wait for the process to exit; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        stop_process(self.proc)
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_run_server(log_path: Path, **env: str) -> ServerProcess:
    """`orchestrator serve` as `make run` configures it: the reference services embedded on the
    Query and Embedding address (a free port here), plans and the agent check on (the
    defaults ServerProcess turns off). ``env`` adds to or overrides it."""
    reference = f"127.0.0.1:{free_port()}"
    make_run = {
        "ORCH_EMBEDDED_REFERENCE": "true",
        "ORCH_PLANS": "true",
        "ORCH_AGENT_CHECK": "true",
        "ORCH_QUERY_SERVICE_ADDRESS": reference,
        "ORCH_EMBEDDING_SERVICE_ADDRESS": reference,
    }
    return ServerProcess(log_path, **{**make_run, **env})
